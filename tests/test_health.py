"""Run-health warnings: each raised by a run built to show its failure, and absent where it does not.

The healthy reference is the quickstart (tests/test_quickstart.py asserts it raises none); here
every warning gets a run that triggers it and a run like it that must not. The HH runs start
from the pretrained stories260K (a base model, as ORPO expects) on 300 harmless pairs, about
15 s each on 2 busy cores.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from statistics import median

import pytest
import torch
import yaml
from tiny import TINY as TINY_LLAMA
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo.cli import main
from orpo.config import load_config
from orpo.data import DataError
from orpo.train import Trainer, Watcher, read_metrics
from orpo.train.checkpoint import TrainState
from orpo.train.health import (
    GeneralEval,
    GradSpikes,
    InstructStart,
    LambdaTooHigh,
    NoSeparation,
    RejectedRising,
    general_blocks,
    instruct_signs,
    read_general_text,
)

REPO = Path(__file__).resolve().parents[1]
QS = REPO / "examples" / "quickstart"
TINY = {**TINY_LLAMA, "max_position_embeddings": 64}
STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree. She ran to the ball and picked it up. \"Look, Mom! "
    "I found a ball!\" she said. Her mom smiled and said, \"That is a nice ball, Lily. Let's play together.\" "
    "They played with the ball all day long. When the sun went down, they went home and had a yummy dinner.\n\n"
    "Tom was a small dog who liked to run. Every morning he ran to the big tree and back. One day he met a cat "
    "named Sam. Sam was sad because he lost his toy. Tom said, \"Don't be sad, Sam. I will help you find it.\" "
    "They looked under the bed, behind the door and in the garden. At last they found the toy in a box."
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _hh(out, stories_dir, hh_path, beta=0.1, data=None, **train):
    """stories260K (pretrained) on HH pairs; 60 eval pairs, so no_separation is judged."""
    return load_config(raw={
        "model": {"name_or_path": str(stories_dir), "dtype": "float32", "chat_template": "none"},
        "data": {"train": str(hh_path), "max_length": 96, "max_prompt_length": 48, "max_samples": 300,
                 "eval_fraction": 0.2, **(data or {})},
        "orpo": {"beta": beta},
        "train": {"output_dir": str(out), "batch_size": 8, "learning_rate": 1e-3, **train},
    })


def _tiny(out, train_file=QS / "train.jsonl", data=None, **train):
    """A fresh tiny Llama on the quickstart data (its 200 eval pairs)."""
    return load_config(raw={
        "model": {"init": TINY, "tokenizer": str(QS / "tokenizer")},
        "data": {"train": str(train_file), "eval": str(QS / "eval.jsonl"), "max_length": 64, "max_samples": 400,
                 **(data or {})},
        "orpo": {"beta": 1.0},
        "train": {"output_dir": str(out), "batch_size": 16, "learning_rate": 5e-3, **train},
    })


def _run(cfg, **kwargs) -> tuple[Trainer, dict[str, dict]]:
    """Train; return the trainer and the warning rows of metrics.jsonl by code."""
    trainer = Trainer(cfg, progress=False, **kwargs).setup()
    result = trainer.train()
    rows = {r["warning"]: r for r in read_metrics(trainer.output_dir) if "warning" in r}
    assert set(rows) == set(trainer.state.warnings)  # what was logged is what the state keeps
    assert result.warnings == trainer.state.warnings  # ... and what the closing summary lists
    assert all(f"[{code}] {msg}" in result.render() for code, msg in result.warnings.items())
    return trainer, rows


def _evals(trainer) -> list[dict]:
    return [r for r in read_metrics(trainer.output_dir) if "eval_loss" in r]


def _judge(source: Trainer, code: str, out: Path, **health) -> int | None:
    """Replay ``source``'s eval rows through the ``code`` watcher of a trainer built from the same config
    with other train.health values; the step at which it warns (None: never)."""
    cfg = source.cfg.model_copy(deep=True)
    cfg.train.health = cfg.train.health.model_copy(update=health)
    cfg.train.output_dir = str(out)
    trainer = Trainer(cfg, progress=False)
    trainer.state, trainer.total_steps, trainer.logger, trainer.is_main = TrainState(), source.total_steps, None, True
    (watcher,) = [w for w in trainer.watchers if getattr(w, "code", None) == code]
    watcher.on_start(trainer)
    for row in _evals(source):
        trainer.state.step = row["step"]
        watcher.on_eval(trainer, row)
        if code in trainer.state.warnings:
            return row["step"]
    return None


# ---------------------------------------------------------------------------------------------
# lambda_too_high and rejected_rising: the two ends of λ


@pytest.fixture(scope="module")
def huge_lambda(tmp_path_factory, stories_dir, hh_path):
    """λ = 50: the odds-ratio term swamps the NLL and the chosen responses' NLL climbs."""
    out = tmp_path_factory.mktemp("health") / "l50"
    return _run(_hh(out, stories_dir, hh_path, beta=50, max_steps=20, eval_every=10))


@pytest.fixture(scope="module")
def zero_lambda(tmp_path_factory, stories_dir, hh_path):
    """λ = 0: plain SFT on the chosen responses; the rejected ones ride along."""
    out = tmp_path_factory.mktemp("health") / "l0"
    return _run(_hh(out, stories_dir, hh_path, beta=0, max_steps=30, eval_every=10))


def test_lambda_too_high_is_raised_by_a_huge_lambda(huge_lambda):
    trainer, warned = huge_lambda
    assert "lambda_too_high" in warned and "rejected_rising" not in warned
    row = warned["lambda_too_high"]
    evals = {r["step"]: r for r in _evals(trainer)}
    first, now = evals[0], evals[row["step"]]
    assert now["eval_nll_loss"] >= 1.05 * first["eval_nll_loss"]  # what the warning claims, from the eval rows
    assert now["eval_or_loss"] <= first["eval_or_loss"] - 0.05
    assert "orpo.beta = 50" in row["message"] and f"{first['eval_nll_loss']:.3f}" in row["message"]


def test_rejected_rising_is_raised_by_lambda_zero(zero_lambda):
    trainer, warned = zero_lambda
    assert "rejected_rising" in warned and "lambda_too_high" not in warned
    step = warned["rejected_rising"]["step"]
    evals = {r["step"]: r for r in _evals(trainer)}
    before, now = evals[step - 20], evals[step]  # the window: three evals, ten steps apart
    rose_c = now["eval_logps_chosen"] - before["eval_logps_chosen"]
    rose_r = now["eval_logps_rejected"] - before["eval_logps_rejected"]
    assert rose_c >= 0.05 and rose_r >= max(0.05, 0.5 * rose_c)
    assert step - 20 > 0  # never judged on a window starting at the step-0 eval
    assert f"between steps {step - 20} and {step}" in warned["rejected_rising"]["message"]


@pytest.fixture(scope="module")
def quickstart_start(tmp_path_factory) -> Path:
    """The quickstart model after 100 steps: past learning the data's language (both log-probs rose),
    far from done (eval accuracy 0.65): a pretrained start on which every check is judged."""
    out = tmp_path_factory.mktemp("health") / "qs100"
    raw = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    raw["model"]["tokenizer"] = str(QS / "tokenizer")
    raw["data"].update(train=str(QS / "train.jsonl"), eval=str(QS / "eval.jsonl"))
    raw["train"].update(output_dir=str(out), max_steps=100, save_every=None, eval_every=None)
    Trainer(load_config(raw=raw), progress=False).setup().train()
    return out / "final"


def test_a_healthy_run_from_a_pretrained_start_raises_nothing(quickstart_start, tmp_path):
    """ORPO at λ = 1 from the 100-step quickstart model: chosen rises, rejected does not, accuracy climbs.
    Every check is judged here (a pretrained start, 200 eval pairs, a norm logged at every step), and
    none may warn. Its rejected log-probs do tick up between some evals (steps 40 -> 50: +0.10 while chosen
    rose +0.08), which a two-eval, quarter-of-training window took for the SFT-like regime."""
    cfg = load_config(raw={
        "model": {"name_or_path": str(quickstart_start), "dtype": "float32"},
        "data": {"train": str(QS / "train.jsonl"), "eval": str(QS / "eval.jsonl"), "max_length": 64},
        "orpo": {"beta": 1.0},
        "train": {"output_dir": str(tmp_path / "healthy"), "max_steps": 60, "batch_size": 32, "learning_rate": 2e-3,
                  "lr_scheduler": "constant", "eval_every": 10, "log_every": 1},
    })
    trainer, warned = _run(cfg)
    assert warned == {}
    assert {type(w) for w in trainer.watchers} >= {InstructStart, LambdaTooHigh, RejectedRising, NoSeparation,
                                                  GradSpikes}
    evals = _evals(trainer)
    first, last = evals[0], evals[-1]
    rose_c = last["eval_logps_chosen"] - first["eval_logps_chosen"]
    rose_r = last["eval_logps_rejected"] - first["eval_logps_rejected"]
    assert rose_c > 0.2 and rose_r < 0.5 * rose_c  # the NLL term works, and rejected does not follow
    assert last["eval_accuracy"] > first["eval_accuracy"] + 0.03
    # the checks were live: the old window (two evals, 0.25 of training) warns on these very rows
    assert _judge(trainer, "rejected_rising", tmp_path / "old", rejected_window=0.25, rejected_evals=2) == 50


def test_curve_thresholds_come_from_train_health(tmp_path, huge_lambda, zero_lambda):
    """The same eval rows, judged by watchers built from other train.health values, on a real trainer."""
    big, zero = huge_lambda[0], zero_lambda[0]

    def judge(source, code, **health):
        return _judge(source, code, tmp_path / code, **health)

    assert judge(big, "lambda_too_high") == huge_lambda[1]["lambda_too_high"]["step"] == 10
    assert judge(big, "lambda_too_high", nll_rise=0.5) is None
    assert judge(big, "lambda_too_high", min_change=0.5) is None
    # evals at 10, 20, 30 (step 0 never counts): the default window (0.5 x 30 steps, at least 3 evals)
    # is first complete at step 30 and spans 10 -> 30
    assert judge(zero, "rejected_rising") == zero_lambda[1]["rejected_rising"]["step"] == 30
    assert judge(zero, "rejected_rising", rejected_evals=2) == 20  # 10 -> 20 is enough then
    assert judge(zero, "rejected_rising", rejected_rise=1.5) is None
    assert judge(zero, "rejected_rising", rejected_start=1.0, rejected_evals=2) == 30
    # at step 30 the two-eval window is 20 -> 30 (chosen +0.09); the three-eval one 10 -> 30 (+0.33)
    assert judge(zero, "rejected_rising", rejected_evals=2, rejected_start=1.0, min_change=0.1) is None
    assert judge(zero, "rejected_rising", rejected_start=1.0, min_change=0.1) == 30


def test_health_section_builds_the_watchers_it_names(tmp_path, stories_dir, hh_path):
    def codes(**health):
        trainer = Trainer(_hh(tmp_path, stories_dir, hh_path, health=health), progress=False)
        return [type(w) for w in trainer.watchers if type(w).__module__ == "orpo.train.health"]

    assert codes() == [InstructStart, LambdaTooHigh, RejectedRising, NoSeparation, GradSpikes]
    assert codes(ignore=["instruct_start", "grad_spikes"]) == [LambdaTooHigh, RejectedRising, NoSeparation]
    assert codes(enabled=False) == []
    with pytest.raises(Exception, match="ignore"):
        codes(ignore=["no_such_warning"])


# ---------------------------------------------------------------------------------------------
# no_separation


def test_no_separation_is_raised_by_shuffled_labels(tmp_path):
    rows = [json.loads(line) for line in (QS / "train.jsonl").read_text().splitlines()][:400]
    rng = random.Random(0)
    for r in rows:
        if rng.random() < 0.5:
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer, warned = _run(_tiny(tmp_path / "run", shuffled, max_steps=12, eval_every=6))
    assert set(warned) == {"no_separation"}
    row = warned["no_separation"]
    assert row["step"] == 6  # the first eval at or past separation_after = 0.5 of training
    ev = {r["step"]: r for r in _evals(trainer)}[6]
    assert ev["eval_pairs"] == 200 and (ev["eval_accuracy"] <= 0.55 or ev["eval_log_odds_ratio"] <= 0)

    # a smaller eval set than min_eval_pairs is not judged (0.55 would be noise); nor before the share
    small, warned = _run(_tiny(tmp_path / "small", shuffled, data={"max_samples": 100}, max_steps=12,
                               eval_every=6, health={"min_eval_pairs": 201}))
    assert warned == {}
    late, warned = _run(_tiny(tmp_path / "late", shuffled, max_steps=12, eval_every=6,
                              health={"separation_after": 1.0, "min_accuracy": 0.0}))
    last = _evals(late)[-1]
    assert ("no_separation" in warned) == (last["eval_log_odds_ratio"] <= 0)


# ---------------------------------------------------------------------------------------------
# instruct_start


def test_instruct_signs_from_names_and_templates(stories_tokenizer):
    for name in ("Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-2-7b-chat-hf", "google/gemma-2-2b-it",
                 "HuggingFaceH4/zephyr-7b-sft-full", "/models/SmolLM2-135M-Instruct/"):
        assert instruct_signs(name, stories_tokenizer), name
    for name in ("Qwen/Qwen2.5-0.5B", "HuggingFaceTB/SmolLM2-135M", "meta-llama/Meta-Llama-3-8B",
                 "../shared/assets/stories260K/hf", "italian-gpt2", "chatterbox-base", None):
        assert instruct_signs(name, stories_tokenizer) == [], name
    # a chat template that ends turns with the tokenizer's EOS: what chat tuning does
    tok = AutoTokenizer.from_pretrained(str(QS / "tokenizer"))
    assert tok.chat_template and instruct_signs("base", tok) == []  # ChatML turns end in <|im_end|>, eos is </s>
    tok.eos_token = "<|im_end|>"
    assert instruct_signs("base", tok) == ["its chat template ends turns with its EOS token '<|im_end|>'"]


def test_instruct_start_is_raised_for_an_instruct_named_model(tmp_path, stories_dir, hh_path):
    instruct = tmp_path / "stories260K-Instruct"
    shutil.copytree(stories_dir, instruct)
    cfg = _hh(tmp_path / "run", stories_dir, hh_path, max_steps=1, data={"max_samples": 16, "eval_fraction": 0.0})
    cfg.model.name_or_path = str(instruct)
    _, warned = _run(cfg)
    assert set(warned) == {"instruct_start"} and warned["instruct_start"]["step"] == 0
    assert "stories260K-Instruct" in warned["instruct_start"]["message"]

    cfg.model.name_or_path, cfg.train.output_dir = str(stories_dir), str(tmp_path / "base")
    assert _run(cfg)[1] == {}
    cfg.model.name_or_path, cfg.train.output_dir = str(instruct), str(tmp_path / "ignored")
    cfg.train.health.ignore = ["instruct_start"]
    assert _run(cfg)[1] == {}


# ---------------------------------------------------------------------------------------------
# grad_spikes


class LrSpike(Watcher):
    """Multiply the learning rate of the next optimizer step (only) by ``factor`` after ``step``."""

    def __init__(self, step, factor):
        self.step, self.factor = step, factor

    def on_step(self, trainer, row):
        if trainer.state.step == self.step:
            for group in trainer.optimizer.param_groups:
                group["lr"] *= self.factor


def test_grad_spikes_is_raised_by_a_learning_rate_spike(tmp_path):
    def run(name, watchers=(), **health):
        return _run(_tiny(tmp_path / name, data={"eval": None}, max_steps=32, learning_rate=1e-3,
                          lr_scheduler="constant", health=health), watchers=list(watchers))

    calm, warned = run("calm")
    assert warned == {}
    spiked, warned = run("spiked", [LrSpike(24, 3000.0)])
    assert set(warned) == {"grad_spikes"}
    step = warned["grad_spikes"]["step"]
    norms = {r["step"]: r["grad_norm"] for r in read_metrics(spiked.output_dir) if "grad_norm" in r}
    assert 25 <= step <= 27 and norms[step] > 10 * median(norms[s] for s in range(step - 20, step))
    assert f"step {step}:" in warned["grad_spikes"]["message"]
    _, warned = run("tolerant", [LrSpike(24, 3000.0)], spike_factor=1e9)
    assert warned == {}


# ---------------------------------------------------------------------------------------------
# forgetting: eval_general_ppl


@pytest.fixture(scope="module")
def story_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("general") / "stories.txt"
    path.write_text(STORY)
    return path


def _forgetting(out, stories_dir, hh_path, story_file, lr, **health):
    return _hh(out, stories_dir, hh_path, data={"max_samples": 200, "eval_fraction": 0.1,
                                                  "general_eval": str(story_file)},
               max_steps=10, eval_every=5, learning_rate=lr, health=health)


@pytest.fixture(scope="module")
def forgetting(tmp_path_factory, stories_dir, hh_path, story_file):
    """lr 1e-3 on HH pairs: the model drifts away from its stories."""
    out = tmp_path_factory.mktemp("forgetting") / "run"
    return _run(_forgetting(out, stories_dir, hh_path, story_file, lr=1e-3))


def test_forgetting_is_raised_when_general_perplexity_climbs(forgetting, tmp_path, stories_dir, hh_path, story_file):
    trainer, warned = forgetting
    assert "forgetting" in warned
    ppl = {r["step"]: r["eval_general_ppl"] for r in _evals(trainer)}
    assert sorted(ppl) == [0, 5, 10] and ppl[warned["forgetting"]["step"]] > 1.2 * ppl[0]

    slow, warned = _run(_forgetting(tmp_path / "slow", stories_dir, hh_path, story_file, lr=1e-5))
    assert "forgetting" not in warned
    ppl = [r["eval_general_ppl"] for r in _evals(slow)]
    assert len(ppl) == 3 and max(ppl) < 1.2 * ppl[0]


def test_general_ppl_is_the_perplexity_of_the_saved_model(forgetting):
    """The last eval's eval_general_ppl, recomputed from final/ with transformers' own loss, block by block."""
    trainer, _ = forgetting
    model = AutoModelForCausalLM.from_pretrained(str(trainer.output_dir / "final")).eval()
    tok = AutoTokenizer.from_pretrained(str(trainer.output_dir / "final"))
    ids = tok(STORY)["input_ids"]
    assert ids[0] == tok.bos_token_id  # the tokenizer's own special tokens: a BOS, no EOS
    nll, count = 0.0, 0
    for i in range(0, len(ids), 96):  # data.max_length blocks
        block = torch.tensor([ids[i : i + 96]])
        with torch.no_grad():
            nll += model(block, labels=block).loss.item() * (block.shape[1] - 1)
        count += block.shape[1] - 1
    assert count > 96  # at least two blocks
    assert _evals(trainer)[-1]["eval_general_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_general_text_files_and_blocks(tmp_path, stories_tokenizer):
    jsonl = tmp_path / "general.jsonl"
    jsonl.write_text(json.dumps({"text": "Once upon a time"}) + "\n\n" + json.dumps({"text": STORY}) + "\n")
    docs = read_general_text(jsonl)
    assert docs == ["Once upon a time", STORY]
    blocks = general_blocks(docs, stories_tokenizer, 16)
    first, rest = stories_tokenizer("Once upon a time")["input_ids"], stories_tokenizer(STORY)["input_ids"]
    assert blocks[0] == first and [t for b in blocks[1:] for t in b] == rest  # documents never share a block
    assert all(len(b) == 16 for b in blocks[1:-1]) and 1 < len(blocks[-1]) <= 16
    assert general_blocks(docs, stories_tokenizer, 16) == blocks  # deterministic

    text = tmp_path / "plain.txt"
    text.write_text(STORY)
    assert read_general_text(text) == [STORY]  # a plain file is one document
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: field 'text' is missing"):
        read_general_text(bad)
    with pytest.raises(DataError, match="file not found"):
        read_general_text(tmp_path / "missing.txt")


def test_a_bad_general_eval_file_is_a_clear_cli_error(tmp_path, stories_dir, hh_path, capsys):
    import yaml

    cfg = _hh(tmp_path / "run", stories_dir, hh_path, max_steps=1,
              data={"max_samples": 16, "general_eval": str(tmp_path / "none.txt")})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", str(path)]) == 2
    assert "data.general_eval: file not found" in capsys.readouterr().err
    assert not (tmp_path / "run" / "final").exists()


def test_general_eval_needs_eval_data(tmp_path, stories_dir, hh_path, story_file):
    with pytest.raises(Exception, match="data.general_eval is measured at each eval"):
        _hh(tmp_path, stories_dir, hh_path, data={"eval_fraction": 0.0, "general_eval": str(story_file)})
    assert isinstance(Trainer(_forgetting(tmp_path, stories_dir, hh_path, story_file, lr=1e-3)).watchers[0],
                      GeneralEval)
