"""Chunked log-probs (``train.logps``) equal the full-logits path and never build [targets, vocab] logits.

Tolerance, float32: both paths do the same products, grouped differently. The chunked backward
sums the LM head's weight gradient chunk by chunk (and the plain one in one matmul) and takes the
softmax from the forward's logsumexp, so values differ by round-off only: float32 has eps =
1.2e-7 and a gradient entry sums ~100 rows of products of 512-way softmaxes. Measured: at most
1e-6 of the largest magnitude of each compared tensor (0 for the loss). We allow 1e-4 of that
largest magnitude: 100x above round-off, 100x below a real error (a wrong softmax, a missing
chain-rule factor or a dropped chunk moves values by 1e-2 or more).
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from orpo.config import ConfigError, ModelConfig, load_config
from orpo.data.collate import PaddedLayout, build_layout
from orpo.loss import sequence_logps
from orpo.train import load_model, load_tokenizer
from orpo.train.chunked import LogitTransform, chunked_loss, chunked_token_logps
from orpo.train.forward import configure_logps, logps_plan, pair_chunks, token_logps
from orpo.train.model import logits_keep_mode
from orpo.train.objective import (
    CPOObjective,
    DPOObjective,
    ORPOObjective,
    SFTObjective,
    SimPOObjective,
)
from orpo.train.trainer import Trainer, _collate

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 5  # divides none of the row counts below (asserted)
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64}
MODELS = {
    "stories260K": {},  # the real pretrained Llama, untied head
    "qwen2-tied": {"init": {"arch": "qwen2", **TINY, "tie_word_embeddings": True}},
    "gemma2-softcap": {"init": {"arch": "gemma2", **TINY, "head_dim": 8, "final_logit_softcapping": 1.5}},
    "cohere-logit-scale": {"init": {"arch": "cohere", **TINY, "logit_scale": 0.25}},
    "granite-logits-scaling": {"init": {"arch": "granite", **TINY, "logits_scaling": 3.0}},
    "stories-lora-modules-to-save": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["lm_head"]}},
    "stories-lora-frozen-head": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}},  # ∂/∂h in the forward
}


def _model(stories_dir, spec: dict):
    cfg = {**spec, "tokenizer": str(stories_dir), "dtype": "float32"}
    if "init" not in cfg:
        cfg["name_or_path"] = str(stories_dir)
    mcfg = ModelConfig.model_validate(cfg)
    model = load_model(mcfg, load_tokenizer(mcfg), seed=3)
    return model.train()


def _rows(n: int = 4, seed: int = 0) -> list[dict]:
    """Pairs of different prompt/response lengths (token ids of the 512-token stories vocabulary),
    with made-up reference log-probs for DPO (constants of each pair)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p, c, r = (torch.randint(3, 500, (k,), generator=g).tolist() for k in (4 + 2 * i, 6 + 3 * i, 3 + 5 * i))
        rows.append({"chosen_input_ids": [1, *p, *c], "chosen_prompt_len": 1 + len(p),
                     "rejected_input_ids": [1, *p, *r], "rejected_prompt_len": 1 + len(p),
                     "ref_chosen_sum": -40.0 - 9 * i, "ref_rejected_sum": -30.0 - 14 * i})
    return rows


def _run(model, mode: str, batch, objective, autocast_forward: bool = False, chunk: int = CHUNK):
    """Loss, per-pair log-probs and every parameter's gradient through ``objective`` with ``mode``.

    ``autocast_forward``: bf16 autocast inside ``model.forward`` only, as Accelerate's mixed precision.
    """
    model = copy.deepcopy(model)
    if autocast_forward:
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    configure_logps(model, mode, chunk)
    assert logps_plan(model).chunked == (mode == "chunked")
    out = objective(model, batch)
    out.loss.backward()
    with torch.no_grad():
        sums, counts = sequence_logps(token_logps(model, batch), batch.segment_ids, batch.response_mask,
                                      2 * batch.num_pairs)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, sums / counts, grads


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.detach(), b.detach()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * float(b.abs().max()) + 1e-12, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_equals_full_logits(name, stories_dir):
    model = _model(stories_dir, MODELS[name])
    objective = ORPOObjective(beta=0.2, nll_on_prompt=name == "qwen2-tied")
    batch = objective.prepare(PaddedLayout(0)(_rows()), logits_keep_mode(model))
    n_targets = int((batch.labels != -100).sum())
    assert n_targets % CHUNK, "the chunk size must not divide the row count"

    full, full_pairs, full_grads = _run(model, "full", batch, objective)
    chunked, chunked_pairs, chunked_grads = _run(model, "chunked", batch, objective)

    _close(chunked.loss, full.loss, "loss")
    _close(chunked_pairs, full_pairs, "per-pair log-probs")
    assert full_grads.keys() == chunked_grads.keys() and len(full_grads) > 4
    for key, g in full_grads.items():
        assert g is not None and chunked_grads[key] is not None, key
        _close(chunked_grads[key], g, key)
    if name == "qwen2-tied":  # one tensor: the head's gradient went into the embedding's
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        assert inner.lm_head.weight is inner.model.embed_tokens.weight
    if name == "stories-lora-modules-to-save":
        trained = [k for k in full_grads if "lm_head" in k]
        assert trained and all("modules_to_save" in k for k in trained), trained


OBJECTIVES = {
    "orpo": ORPOObjective(beta=0.2),
    "sft": SFTObjective(nll_on_prompt=True),
    "simpo": SimPOObjective(beta=2.0, gamma=0.5, nll_weight=0.3),
    "cpo": CPOObjective(beta=0.1),
    "dpo": DPOObjective(beta=0.1),
}
CHUNK_OF_PAIRS = 40  # the 6 pairs' rows: 9, 17, 25, 33, 41, 49 -> chunks of 2, 1, 1, 1 (longer), 1 (longer) pairs


def _assert_same_step(full, chunked, full_grads, chunked_grads) -> None:
    """Loss, every term and pair metric the logs read, and every parameter's gradient."""
    _close(chunked.loss, full.loss, "loss")
    assert chunked.term_sums.keys() == full.term_sums.keys() and chunked.pair_sums.keys() == full.pair_sums.keys()
    for key in full.term_sums:
        _close(chunked.term_sums[key], full.term_sums[key], f"term_sums[{key}]")
    # margins are differences of the chosen and rejected sums: round-off of the largest operand
    scale = max(float(v.abs()) for v in full.pair_sums.values())
    for key in full.pair_sums:
        torch.testing.assert_close(chunked.pair_sums[key], full.pair_sums[key], rtol=0, atol=1e-5 * scale,
                                   msg=lambda m, key=key: f"pair_sums[{key}]: {m}")
    assert full_grads.keys() == chunked_grads.keys()
    for key, g in full_grads.items():
        assert g is not None and chunked_grads[key] is not None, key
        _close(chunked_grads[key], g, key)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt", "packed_shared_prompt"])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_and_layout_gets_the_full_logits_loss_metrics_and_gradients(objective, layout, stories_dir):
    """The chunked head computes each chunk's gradient in its forward from the objective's own
    per-pair math: chunks of several pairs and pairs longer than a chunk, every batch layout."""
    model = _model(stories_dir, {})
    obj = OBJECTIVES[objective]
    batch = obj.prepare(build_layout(layout, 0, 64)(_rows(6)), logits_keep_mode(model))
    chunks = pair_chunks(batch.pair_rows, CHUNK_OF_PAIRS)
    assert any(p1 - p0 > 1 for p0, p1, _, _ in chunks) and any(e - s > CHUNK_OF_PAIRS for _, _, s, e in chunks)
    full, _, full_grads = _run(model, "full", batch, obj)
    chunked, _, chunked_grads = _run(model, "chunked", batch, obj, chunk=CHUNK_OF_PAIRS)
    _assert_same_step(full, chunked, full_grads, chunked_grads)


@pytest.mark.parametrize("name", ["qwen2-tied", "gemma2-softcap", "stories-lora-frozen-head"])
@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_other_heads_with_the_objectives_and_the_step_normalizers(name, objective, stories_dir):
    """A tied head, a soft-capped one and a frozen one (LoRA), with the global normalizers the
    trainer passes (tensors of the whole step's counts, not this batch's)."""
    model = _model(stories_dir, MODELS[name])
    obj = OBJECTIVES[objective]
    batch = obj.prepare(PaddedLayout(0)(_rows(6, seed=2)), logits_keep_mode(model))
    norms = {"token_normalizer": torch.tensor(123.0), "pair_normalizer": torch.tensor(17.0)}
    results = []
    for mode, chunk in (("full", CHUNK), ("chunked", CHUNK_OF_PAIRS)):
        m = copy.deepcopy(model)
        configure_logps(m, mode, chunk)
        out = obj(m, batch, **norms)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (full, full_grads), (chunked, chunked_grads) = results
    _assert_same_step(full, chunked, full_grads, chunked_grads)


class _HeadMatmuls(TorchDispatchMode):
    """Counts matrix products with a vocabulary-sized dimension: the LM head's."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
               torch.ops.aten.bmm.default}

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.count = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, out)) if isinstance(t, torch.Tensor)]
        # the model's own head runs on an empty input (no rows): it costs nothing
        if func in self.MATMULS and any(self.vocab in t.shape for t in tensors) and out.numel():
            self.count += 1
        return out


@pytest.mark.parametrize(("name", "per_chunk"), [("stories260K", 3), ("stories-lora-frozen-head", 2)])
def test_no_head_matmul_is_recomputed_in_backward(name, per_chunk, stories_dir):
    """3 head matmuls per chunk in a training forward + backward (logits, ∂h, ∂W), 2 with a frozen
    head: as many as the plain path (it was 4 and 2: the backward recomputed the logits); a pair
    longer than a chunk, 4 (3) per slice of it. Without a
    gradient (evaluation) the logits only: no gradient is computed."""
    model = _model(stories_dir, MODELS[name])
    configure_logps(model, "chunked", CHUNK_OF_PAIRS)
    objective = ORPOObjective(beta=0.2)
    batch = objective.prepare(PaddedLayout(0)(_rows(6)), logits_keep_mode(model))
    # a pair longer than a chunk runs in two passes over slices of the chunk size (bounded memory):
    # its logits twice, so one more matmul per slice
    sizes = [e - s for _, _, s, e in pair_chunks(batch.pair_rows, CHUNK_OF_PAIRS)]
    assert any(n > CHUNK_OF_PAIRS for n in sizes) and any(n <= CHUNK_OF_PAIRS for n in sizes)
    expected = sum(per_chunk if n <= CHUNK_OF_PAIRS else (per_chunk + 1) * -(-n // CHUNK_OF_PAIRS) for n in sizes)
    with _HeadMatmuls(512) as train:
        objective(model, batch).loss.backward()
    assert train.count == expected
    with torch.no_grad(), _HeadMatmuls(512) as evaluation:
        out = objective(model, batch)
    assert evaluation.count == len(range(0, int(batch.targets.numel()), CHUNK_OF_PAIRS))
    assert not out.loss.requires_grad


def test_chunks_hold_whole_pairs_in_pair_order():
    assert pair_chunks((3, 4, 10, 2, 2), 8) == [(0, 2, 0, 7), (2, 3, 7, 17), (3, 5, 17, 21)]
    assert pair_chunks((9,), 8) == [(0, 1, 0, 9)]
    assert pair_chunks((), 8) == []


@pytest.mark.parametrize("max_rows", [None, 3])
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.5, softcap=2.0)])
@pytest.mark.parametrize(("bias", "frozen_head"), [(False, False), (True, False), (False, True)])
def test_chunked_loss_matches_autograd_in_float64(transform, bias, frozen_head, max_rows, monkeypatch):
    """The fused autograd function alone, against log_softmax + autograd in float64: a loss that is
    non-linear in each group's log-prob sum (like a pair's), an upstream scale, a bias, a frozen head.
    ``max_rows`` 3: the chunks of 4, 7 and 11 rows (one long pair each) run in two passes of at
    most 3 rows of logits: the same values and gradients, and no larger logits tensor."""
    import orpo.train.chunked as chunked

    seen = []
    real = chunked._logits

    def recording(h, *a):
        seen.append(h.shape[0])
        return real(h, *a)

    monkeypatch.setattr(chunked, "_logits", recording)
    g = torch.Generator().manual_seed(1)
    m, h, v = 23, 9, 37
    hidden = torch.randn(m, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=not frozen_head)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (m,), generator=g)
    bounds = [0, 4, 11, 12, 23]

    def group_loss(logps: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-0.3 * logps.sum()) + logps.square().mean()

    loss, logps = chunked_loss(hidden, weight, b, targets, bounds,
                               lambda k, x: group_loss(x), transform, max_rows=max_rows)
    assert max(seen) == (3 if max_rows else 11)
    wanted = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(2.5 * loss, wanted)

    z = torch.nn.functional.linear(hidden, weight, b) * transform.scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    ref = torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1)
    ref_loss = sum(group_loss(ref[s:e]) for s, e in zip(bounds[:-1], bounds[1:], strict=True))
    ref_grads = torch.autograd.grad(2.5 * ref_loss, wanted)
    assert not logps.requires_grad
    torch.testing.assert_close(logps.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-6, atol=1e-6)
    # the chunk's loss and its gradient run on float32 log-probs (as every objective's): float32 round-off
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize(("name", "how"), [("qwen2-tied", "autocast"), ("gemma2-softcap", "bf16-weights")])
def test_chunked_in_bfloat16(name, how, stories_dir):
    """bf16 weights, or float32 weights with a bf16-autocast forward (what Accelerate's
    mixed_precision does: autocast inside ``model.forward`` only, so the chunked head, which runs
    after it, must compute in bf16 too). Gradients come back in each parameter's dtype. Tolerance:
    bf16 keeps 8 bits, and the two paths round at different points (measured: ≤ 1.4e-2 of the
    largest gradient, 4 bf16 ulps)."""
    from orpo.train.forward import HeadCapture, _head_linears

    model = _model(stories_dir, MODELS[name])
    autocast = how == "autocast"
    if not autocast:
        model = model.to(torch.bfloat16)
    objective = ORPOObjective(beta=0.2)
    batch = objective.prepare(PaddedLayout(0)(_rows()), logits_keep_mode(model))
    with HeadCapture(_head_linears(model), skip_head=True) as cap, torch.autocast("cpu", enabled=autocast):
        model(**batch.inputs)
    assert cap.single()[2] == torch.bfloat16  # the dtype the chunked head computes in
    full, full_pairs, full_grads = _run(model, "full", batch, objective, autocast)
    chunked, chunked_pairs, chunked_grads = _run(model, "chunked", batch, objective, autocast)
    torch.testing.assert_close(chunked.loss.detach(), full.loss.detach(), rtol=1e-3, atol=0)
    torch.testing.assert_close(chunked_pairs, full_pairs, rtol=1e-3, atol=0)
    for key, g in full_grads.items():
        assert chunked_grads[key].dtype == g.dtype == next(p for n, p in model.named_parameters() if n == key).dtype
        torch.testing.assert_close(chunked_grads[key].float(), g.float(), rtol=0, atol=5e-2 * float(g.abs().max()))


@pytest.mark.parametrize("keep_mode", ["positions", None])
def test_chunked_equals_full_without_mask_keep(keep_mode, stories_dir):
    """``logits_to_keep`` as column positions, or not at all (the head sees every [row, position])."""
    model = _model(stories_dir, {})
    objective = ORPOObjective(beta=0.1)
    batch = objective.prepare(PaddedLayout(0)(_rows(3, seed=1)), keep_mode)
    full, full_pairs, full_grads = _run(model, "full", batch, objective)
    chunked, chunked_pairs, chunked_grads = _run(model, "chunked", batch, objective)
    _close(chunked.loss, full.loss, "loss")
    _close(chunked_pairs, full_pairs, "per-pair log-probs")
    for key, g in full_grads.items():
        _close(chunked_grads[key], g, key)


@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.5, softcap=2.0)])
@pytest.mark.parametrize(("bias", "frozen_head"), [(False, False), (True, False), (False, True)])
def test_chunked_function_matches_autograd_in_float64(transform, bias, frozen_head):
    """The autograd function alone, against log_softmax + autograd in float64 (odd shapes, a bias,
    a frozen head whose hidden-state gradient is computed in the forward)."""
    g = torch.Generator().manual_seed(0)
    m, h, v = 23, 9, 37
    hidden = torch.randn(m, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=not frozen_head)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (m,), generator=g)
    upstream = torch.randn(m, generator=g, dtype=torch.float64)

    ours = chunked_token_logps(hidden, weight, b, targets, transform, chunk_size=5)
    wanted = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad((ours * upstream).sum(), wanted)

    z = torch.nn.functional.linear(hidden, weight, b) * transform.scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    ref = torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), wanted)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)  # ours: float32 out
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


class _LargestLogits(TorchDispatchMode):
    """Records the most rows of any tensor an op creates whose last dimension is the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # a transposed weight ([hidden, vocab] view) is no new tensor
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab:
                    self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("logps", ["chunked", "full"])
def test_train_logps_reaches_the_step(logps, tmp_path, stories_dir, hh_path):
    """The key, read back from what ran: the largest [rows, vocab] tensor of a training step."""
    cfg = load_config(raw={
        "model": {"init": {"arch": "llama", **TINY}, "tokenizer": str(stories_dir)},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 4},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 4, "logps": logps,
                  "logps_chunk_size": CHUNK},
    })
    trainer = Trainer(cfg, progress=False).setup()
    rows = trainer.train_data.__getitems__(list(range(4)))
    batch = partial(_collate, layout=trainer.layout, objective=trainer.objective, keep_mode=trainer.keep_mode)(rows)
    targets = int((batch.labels != -100).sum())
    assert targets > 4 * CHUNK
    with _LargestLogits(512) as seen:
        trainer._forward_backward([batch])
    assert logps_plan(trainer.model).chunked == (logps == "chunked")
    if logps == "chunked":  # never more than CHUNK rows of logits, though these pairs exceed CHUNK (two passes)
        assert max(batch.pair_rows) > CHUNK == seen.rows
    else:
        assert seen.rows >= targets


def test_auto_falls_back_with_a_note_when_the_head_is_not_a_plain_linear(stories_dir):
    """LoRA on lm_head itself: auto says why and uses the full logits; chunked refuses."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(stories_dir, {}), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    plan = configure_logps(model, "auto")
    assert not plan.chunked and "not a plain nn.Linear" in plan.note
    assert logps_plan(model) is plan
    with pytest.raises(ConfigError, match="train.logps: chunked is not possible"):
        configure_logps(model, "chunked")


def test_auto_falls_back_when_the_model_changes_its_logits_in_a_way_we_do_not_know(stories_dir):
    model = _model(stories_dir, {})
    model.register_forward_hook(lambda _m, _a, out: out.__setitem__("logits", out.logits * 2) or out)
    plan = configure_logps(model, "auto")
    assert not plan.chunked and "logit transform we do not know" in plan.note
    assert configure_logps(_model(stories_dir, {}), "auto").chunked


def test_the_row_blocked_logsumexp_is_torchs():
    """``chunked._logsumexp`` works ``LSE_ROWS`` rows at a time (no second ``[chunk, V]`` copy) and
    gives torch's values exactly, a ragged last block and a view as ``out`` included."""
    from orpo.train.chunked import LSE_ROWS, _logsumexp

    z = torch.randn(3 * LSE_ROWS + 5, 1000) * 30
    expected = torch.logsumexp(z, dim=-1)
    assert torch.equal(_logsumexp(z), expected)
    out = torch.zeros(len(z) + 4)
    _logsumexp(z, out=out[2:-2])
    assert torch.equal(out[2:-2], expected) and not out[:2].any() and not out[-2:].any()
