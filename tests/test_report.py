"""`orpo report` on tiny real runs (files, a self-contained page, valid PNGs, a folder that is not a
run) and `train.eval_generate` (samples.jsonl with its keys, the trained model's own greedy text,
TensorBoard text)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch
from tiny import TINY

from orpo.cli import main
from orpo.config import load_config
from orpo.data import prepare_data
from orpo.figures import _colors, _label
from orpo.generation import generate
from orpo.report import FIGURES, NotARunError, default_names, load_run, write_report
from orpo.train import Trainer, read_metrics
from orpo.train.samples import read_samples

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out: Path, stories_dir, hh_path, objective: str, **train) -> Path:
    cfg = load_config(raw={
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 16, "eval_fraction": 0.25},
        "orpo": {"objective": objective},
        "train": {"output_dir": str(out), "max_steps": 4, "batch_size": 3, "learning_rate": 1e-2,
                  "eval_every": 2, **train},
    })
    Trainer(cfg, progress=False).setup().train()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stories_dir, hh_path):
    root = tmp_path_factory.mktemp("runs")
    orpo = _run(root / "a" / "orpo", stories_dir, hh_path, "orpo", eval_generate=2, eval_generate_max_tokens=3,
                report_to=["tensorboard"])
    sft = _run(root / "b" / "orpo", stories_dir, hh_path, "sft")  # same folder name: names must tell them apart
    return orpo, sft


def test_eval_generate_writes_the_trained_models_greedy_completions(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = runs[0]
    samples = read_samples(run)
    assert all(set(s) == {"step", "prompt", "completion", "chosen", "rejected"} for s in samples)
    assert [s["step"] for s in samples] == [0, 0, 2, 2, 4, 4]  # the first 2 eval prompts at every eval
    assert samples[0]["prompt"] == samples[4]["prompt"] and samples[0]["chosen"] != samples[1]["chosen"]
    assert samples[0]["chosen"] != samples[0]["rejected"]
    # the last eval's completions are what the final weights write greedily, in at most 3 new tokens
    tok = AutoTokenizer.from_pretrained(run / "final")
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert json.loads((run / "data_summary.json").read_text())["eval_size"] >= 2
    # decoded text does not round-trip to ids: take the prompts from the run's own eval rows
    cfg = load_config(run / "config.yaml")
    data = prepare_data(cfg.data, tok, chat_template=cfg.model.chat_template, seed=cfg.train.seed)
    ids = [list(r[: n]) for r, n in zip(data.eval["chosen_input_ids"][:2], data.eval["chosen_prompt_len"][:2],
                                        strict=True)]
    new = generate(model, ids, 3, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert all(len(n) <= 3 for n in new) and max(len(n) for n in new) == 3
    assert [tok.decode(n, skip_special_tokens=True) for n in new] == [s["completion"] for s in samples[-2:]]
    # and in TensorBoard, as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "samples/text_summary" in events.Tags()["tensors"]
    assert [e.step for e in events.Tensors("samples/text_summary")] == [0, 2, 4]


def test_a_fresh_run_starts_samples_afresh(runs, stories_dir, hh_path, tmp_path):
    import shutil

    run = shutil.copytree(runs[0], tmp_path / "run")
    assert len(read_samples(run)) == 6
    _run(run, stories_dir, hh_path, "orpo", eval_generate=1, overwrite=True, max_steps=2)
    assert [s["step"] for s in read_samples(run)] == [0, 2]


def test_report_writes_pngs_and_one_self_contained_page(runs, tmp_path):
    out = tmp_path / "report"
    page = write_report(list(runs), out)
    assert page == out / "report.html"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["logps.png", "loss.png", "optim.png", "preference.png"]
    import matplotlib.image

    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01  # not blank
    text = page.read_text()
    # self-contained: every image inlined, nothing fetched from anywhere
    inlined = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert sorted(base64.b64decode(x) for x in inlined) == sorted((out / n).read_bytes() for n in pngs)
    assert not re.search(r"(src|href)=['\"](?!data:)", text) and not re.search(r"(https?|ftp)://", text)
    # and runs no script: the Content-Security-Policy says so before anything else
    assert "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none';" in text
    # both runs, told apart although both folders are called "orpo"; their config, data, samples
    assert "a/orpo" in text and "b/orpo" in text and "sft" in text
    assert "Samples at step 4" in text and "held out from train" in text and "objective: sft" in text
    summary = json.loads((out / "summary.json").read_text())
    evals = [r for r in read_metrics(runs[1]) if "eval_loss" in r]
    change = evals[-1]["eval_logps_rejected"] - evals[0]["eval_logps_rejected"]
    assert summary[1]["change"]["logps_rejected"] == pytest.approx(change)
    assert summary[1]["final"]["accuracy"] == evals[-1]["eval_accuracy"]


def test_every_panel_of_every_figure_is_labelled_and_the_legend_names_every_run(runs):
    import orpo.report as report

    loaded = [load_run(r, n) for r, n in zip(runs, ["odds", "plain"], strict=True)]
    for name in FIGURES:
        fig = getattr(report, f"plot_{name}")(loaded, _colors(len(loaded)))
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert panels, name
        for ax in panels:
            assert ax.get_title() and ax.get_xlabel() == "step" and ax.get_ylabel(), (name, ax.get_title())
        [legend] = fig.legends
        assert {_label(r) for r in loaded} <= {t.get_text() for t in legend.get_texts()}, name
    logps = report.plot_logps(loaded, _colors(2))  # the paper's figure: one change-since-step-0 panel per run
    assert [ax.get_ylabel() for ax in logps.axes if ax.get_visible()][1:] == ["Δ log P since step 0"] * 2


def test_a_folder_that_is_not_a_run_is_a_clear_error_and_writes_nothing(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotARunError, match="no metrics.jsonl"):
        write_report([runs[0], empty], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["report", str(runs[0]), str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orpo report: error:") and "missing is not a run folder" in err
    assert not (tmp_path / "out").exists()


def test_the_cli_names_the_runs(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "r"), "--name", "odds", "--name", "plain"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.html")
    assert [s["name"] for s in json.loads((tmp_path / "r" / "summary.json").read_text())] == ["odds", "plain"]
    assert main(["report", str(runs[0]), "--out", str(tmp_path / "r2"), "--name", "a", "--name", "b"]) == 2


def test_default_names_are_the_shortest_distinct_tails():
    assert default_names([Path("/x/a/run"), Path("/x/b/run")]) == ["a/run", "b/run"]
    assert default_names([Path("/x/sft"), Path("/y/orpo")]) == ["sft", "orpo"]


def test_greedy_completions_restore_training_mode(stories_dir, stories_tokenizer):
    from orpo.train.model import ensure_pad_token, load_model

    ensure_pad_token(stories_tokenizer)
    cfg = load_config(raw={"model": {"init": TINY, "tokenizer": str(stories_dir)}, "data": {"train": "x"}})
    model = load_model(cfg.model, stories_tokenizer, seed=0).train()
    state = torch.get_rng_state()
    out = generate(model, [[1, 5, 6], [1, 9]], 4, pad_token_id=stories_tokenizer.pad_token_id, eos_token_id=None)
    assert [len(x) for x in out] == [4, 4] and model.training
    assert torch.equal(torch.get_rng_state(), state)  # greedy draws nothing: a resumed run stays exact
