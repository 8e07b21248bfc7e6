"""train.torch_compile, train.use_liger_kernel and train.neftune_noise_alpha, read back from the
trainer's model, its hooks and the files it saves."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
import yaml
from safetensors import safe_open
from tiny import TINY, write_short_pairs

from orpo.cli import main
from orpo.config import ConfigError, load_config
from orpo.train import checkpoint as ckpt
from orpo.train.model import base_model
from orpo.train.speed import LIGER_MISSING, is_compiled
from orpo.train.trainer import Trainer, _collate

pytestmark = pytest.mark.usefixtures("one_thread")
ALPHA = 5.0


@pytest.fixture(scope="module")
def short_pairs(tmp_path_factory):
    return write_short_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 12)


def _raw(tmp_path, stories_dir, data_path, name="run", model=None, orpo=None, data=None, **train):
    return {
        "model": {"init": TINY, "tokenizer": str(stories_dir), **(model or {})},
        "data": {"train": str(data_path), "max_length": 64, **(data or {})},
        "orpo": orpo or {"beta": 0.5},
        "train": {"output_dir": str(tmp_path / name), "max_steps": 1, **train},
    }


def _trainer(*args, **kwargs) -> Trainer:
    return Trainer(load_config(raw=_raw(*args, **kwargs)), progress=False).setup()


def _first_loss(run_dir) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if r.get("step") == 1 and "loss" in r)


def _saved_names(run_dir) -> tuple[list[str], list[str]]:
    """Tensor names of final/model.safetensors and of the step-1 checkpoint's model state."""
    import torch.distributed.checkpoint as dcp

    with safe_open(str(run_dir / "final" / "model.safetensors"), "pt") as f:
        final = sorted(f.keys())
    step = ckpt.checkpoint_root(run_dir) / "step-1" / ckpt.STATE_DIR
    checkpoint = sorted(dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata)
    return final, checkpoint


# ---------------------------------------------------------------------------------------------
# torch_compile


def test_torch_compile_compiles_the_forward_and_saves_the_plain_model(tmp_path, stories_dir, short_pairs):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = _trainer(tmp_path, stories_dir, short_pairs, "compiled", torch_compile=True, save_every=1)
    model = compiled.engine.unwrap(compiled.model)
    assert is_compiled(model)
    compiled.train()
    assert counters["stats"]["unique_graphs"] > 0
    # the run's end gives the model its plain forward back (a model object given to train() is trained in place)
    assert not is_compiled(model)

    plain = _trainer(tmp_path, stories_dir, short_pairs, "plain", save_every=1)
    assert not is_compiled(plain.engine.unwrap(plain.model))
    plain.train()
    assert _first_loss(compiled.output_dir) == pytest.approx(_first_loss(plain.output_dir), rel=1e-5)
    final, checkpoint = _saved_names(compiled.output_dir)
    assert (final, checkpoint) == _saved_names(plain.output_dir)
    assert final and not any("_orig_mod" in name for name in final + checkpoint)


# ---------------------------------------------------------------------------------------------
# use_liger_kernel


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU message; the GPU path is not tested here")
def test_liger_kernel_on_a_cpu_is_a_config_error(tmp_path, stories_dir, short_pairs, capsys):
    with pytest.raises(ConfigError, match="use_liger_kernel needs a CUDA GPU"):
        _trainer(tmp_path, stories_dir, short_pairs, "setup", use_liger_kernel=True)
    assert not (tmp_path / "setup" / "config.yaml").exists()

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path, stories_dir, short_pairs, "cli", use_liger_kernel=True)))
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    assert LIGER_MISSING in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# neftune_noise_alpha


class Seen:
    """The first decoder layer's input and the clean embeddings of the same token ids, per forward."""

    def __init__(self, model):
        inner = base_model(model)
        self.embeddings = inner.get_input_embeddings()
        self.ids: list[torch.Tensor] = []
        self.layer_inputs: list[torch.Tensor] = []
        self.handles = [
            self.embeddings.register_forward_pre_hook(lambda m, args: self.ids.append(args[0].detach())),
            inner.model.layers[0].register_forward_pre_hook(self._layer, with_kwargs=True),
        ]

    def _layer(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.layer_inputs.append(x.detach().clone())

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(what the layer saw, the clean embeddings) of each forward so far, then forgets them."""
        with torch.no_grad():
            clean = [self.embeddings.weight[ids] for ids in self.ids]
        out = list(zip(self.layer_inputs, clean, strict=True))
        self.ids, self.layer_inputs = [], []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _train_forward(trainer: Trainer) -> None:
    rows = trainer.train_data.__getitems__(list(range(4)))
    collate = partial(_collate, layout=trainer.layout, objective=trainer.objective, keep_mode=trainer.keep_mode)
    trainer._forward_backward([collate(rows)])


@pytest.mark.parametrize("lora", [False, True])
def test_neftune_adds_bounded_noise_in_training_forwards_only(tmp_path, stories_dir, short_pairs, lora):
    model = {"lora": {"r": 4, "alpha": 8}} if lora else None
    trainer = _trainer(tmp_path, stories_dir, short_pairs, model=model, data={"eval_fraction": 0.25},
                       neftune_noise_alpha=ALPHA)
    inner = base_model(trainer.engine.unwrap(trainer.model))
    assert len(inner.get_input_embeddings()._forward_hooks) == 1
    seen = Seen(trainer.engine.unwrap(trainer.model))

    _train_forward(trainer)
    pairs = seen.pairs()
    assert pairs
    for noisy, clean in pairs:
        bound = ALPHA / math.sqrt(clean.shape[-2] * clean.shape[-1])
        diff = (noisy - clean).abs()
        assert float(diff.max()) <= bound * (1 + 1e-5)
        # uniform in [-bound, bound]: over thousands of values the largest is close to the bound
        assert float(diff.max()) > 0.9 * bound and float(diff.min()) < 0.1 * bound

    trainer.evaluate()
    pairs = seen.pairs()
    assert pairs and all(torch.equal(noisy, clean) for noisy, clean in pairs)

    trainer.train()
    seen.close()
    assert not inner.get_input_embeddings()._forward_hooks


def test_neftune_unset_leaves_the_embeddings_clean(tmp_path, stories_dir, short_pairs):
    trainer = _trainer(tmp_path, stories_dir, short_pairs)
    seen = Seen(trainer.engine.unwrap(trainer.model))
    _train_forward(trainer)
    pairs = seen.pairs()
    assert pairs and all(torch.equal(noisy, clean) for noisy, clean in pairs)
    seen.close()


def test_neftune_never_reaches_the_dpo_reference_pass(tmp_path, stories_dir, short_pairs):
    """The reference log-probs are computed in setup, with the hook already on: they must be the
    clean model's (the same as without NEFTune)."""
    refs = []
    for name, alpha in (("noisy", ALPHA), ("clean", None)):
        # separate caches, or the second run would read the first run's reference columns
        raw = _raw(tmp_path, stories_dir, short_pairs, name, orpo={"objective": "dpo"}, neftune_noise_alpha=alpha)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ORPO_CACHE", str(tmp_path / f"cache-{name}"))
            trainer = Trainer(load_config(raw=raw), progress=False).setup()
        columns = trainer.objective.reference_columns
        assert columns and set(columns) <= set(trainer.train_data.column_names)
        refs.append({c: trainer.train_data[c] for c in columns})
    assert refs[0] == refs[1]
