"""No code from checkpoint files: DCP's ``.metadata`` index is a pickle, and DCP's own load planner
reads non-tensor values with ``torch.load(weights_only=False)``; a crafted checkpoint would run its
code on resume. These readers rebuild only what a checkpoint is made of."""

from __future__ import annotations

import functools
import io
import pickle
from pathlib import Path
from typing import Any

import torch


class _IndexUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` index is a pickle: rebuild only the classes such an index is made of
    (DCP's metadata records, torch sizes, dtypes and layouts, paths); anything else, such as a
    crafted ``os.system`` call, is refused instead of run."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
               "torch.distributed.checkpoint.planner")
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
             ("pathlib", "PureWindowsPath"), ("pathlib._local", "PosixPath"), ("builtins", "set"),
             ("builtins", "frozenset"), ("builtins", "slice")}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.layout):
            return getattr(torch, name)
        if (module in self.MODULES and not name.startswith("__")) or (module, name) in self.NAMES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: not part of a checkpoint index "
                                     "(the file was not written by torch.distributed.checkpoint)")


def read_dcp_metadata(state_dir: Path):
    """The ``.metadata`` of a DCP folder, unpickled with ``_IndexUnpickler``."""
    with open(Path(state_dir) / ".metadata", "rb") as f:
        metadata = _IndexUnpickler(f).load()
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise ValueError(f"holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


@functools.cache
def _safe_dcp_classes():
    """A reader and load planners that never unpickle code: the index through ``_IndexUnpickler``,
    non-tensor values with ``torch.load(weights_only=True)`` (DCP's own planner uses False)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            if kwargs.get("rank") is not None:
                raise ValueError("per-rank DCP metadata is not written by orpo")
            metadata = read_dcp_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class WeightsOnly:
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:  # type: ignore[attr-defined]
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)  # type: ignore[attr-defined]
            else:
                self.state_dict[read_item.dest_index.fqn] = obj  # type: ignore[attr-defined]

    class Planner(WeightsOnly, DefaultLoadPlanner):
        pass

    class EmptyPlanner(WeightsOnly, _EmptyStateDictLoadPlanner):
        pass

    return Reader, Planner, EmptyPlanner


def safe_reader(path: Path):
    """A DCP reader of ``path`` that unpickles no code."""
    return _safe_dcp_classes()[0](path)


def safe_planner(rebuild: bool = False):
    """A DCP load planner that unpickles no code; ``rebuild``: build the state dict from the files
    (nothing to load into, as when looking inside a checkpoint)."""
    return _safe_dcp_classes()[2 if rebuild else 1]()
