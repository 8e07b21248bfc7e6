"""Reading YAML a person did not write (a config file, a dotted override): what ``yaml.safe_load``
lets through is refused here, each as one line naming the source: text that is not UTF-8, more than
MAX_CONFIG_BYTES, nesting past MAX_YAML_DEPTH (PyYAML's composer recurses), aliases that expand past
MAX_YAML_EXPANDED (a billion-laughs bomb) or into a cycle, a key given twice, any tag (``!!python``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_CONFIG_BYTES = 64 << 10  # a config file or one override value; examples are ~2 KiB, PyYAML takes ~1 s here
MAX_YAML_DEPTH = 64  # nesting of sequences and mappings; PyYAML's composer recurses and overflows near 1000
MAX_YAML_EXPANDED = 2 * MAX_CONFIG_BYTES  # nodes + scalar characters, aliases expanded (billion laughs)


class YAMLInputError(ValueError):
    """YAML that is refused; the message is one line and names its source (config.py makes it a ConfigError)."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also refuses what safe_load lets through: nesting deeper than
    MAX_YAML_DEPTH (a RecursionError deep in the composer otherwise), a document whose aliases expand
    past MAX_YAML_EXPANDED (or into a cycle), and a key given twice in one mapping (the last one
    silently won)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden: not a duplicate
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{short(key)}' (lines {first} and {line})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as e:
            # a scalar that looks like a type but is not one (`2001-02-30`, `!!int x`): say where
            raise yaml.constructor.ConstructorError(None, None, short(e), node.start_mark) from None


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes plus scalar characters of ``node`` with aliases expanded, counted once per distinct node."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise yaml.composer.ComposerError(None, None, "an alias refers to its own anchor (a cycle)", node.start_mark)
    if isinstance(node, yaml.ScalarNode):
        size = 1 + len(node.value)
    else:
        open_.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
        size = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
        open_.discard(id(node))
    if size > MAX_YAML_EXPANDED:
        raise yaml.composer.ComposerError(
            None, None, f"aliases expand it past {MAX_YAML_EXPANDED} nodes and characters (an alias bomb?)",
            node.start_mark,
        )
    sizes[id(node)] = size
    return size


def read_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` within the bounds above; any failure is a one-line ConfigError naming ``source``."""
    if len(text) > MAX_CONFIG_BYTES:
        raise YAMLInputError(f"{source}: {len(text)} characters, above the {MAX_CONFIG_BYTES} a configuration may have")
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as e:  # raised while reading the text in, before any parsing
        line = text.count("\n", 0, e.position) + 1
        char = chr(e.character) if isinstance(e.character, int) else e.character
        raise YAMLInputError(f"{source}: invalid YAML: line {line}: character {char!r} is not allowed in YAML "
                          "text (a binary file?)") from None
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}: " if e.problem_mark else ""
        context = f" ({e.context})" if e.context else ""
        tag = " (only plain YAML is read: no !!python or other tags)" if "constructor for the tag" in str(e) else ""
        raise YAMLInputError(f"{source}: invalid YAML: {where}{short(e.problem)}{context}{tag}") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise YAMLInputError(f"{source}: invalid YAML: {short(e)}") from None
    finally:
        loader.dispose()


def short(value: Any, limit: int = 120) -> str:
    """``value`` as one line of at most ``limit`` characters, for an error message."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path: Path) -> str:
    """The file as UTF-8 text, read only up to MAX_CONFIG_BYTES (a config is never a large file)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise YAMLInputError(f"{path}: cannot read it: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise YAMLInputError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes: not a configuration file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise YAMLInputError(f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}); "
                          "a configuration is a UTF-8 YAML file") from None
