"""``orpo pairs`` end to end on the real stories260K Llama: every strategy and scorer, the output's
format and trace, determinism, resume after a kill, bad rows, and a real OpenAI-compatible server.

Small on purpose: 6-12 rows, 12-16 new tokens, K = 2-3 samples.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orpo.cli import main

GEN = ["--max-new-tokens", "12", "--chat-template", "none"]


def _pairs(capsys, *args: str) -> dict:
    """Run ``orpo pairs ... --json`` in this process; the summary."""
    capsys.readouterr()
    assert main(["pairs", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def hh_rows(hh_path: Path) -> list[dict]:
    with gzip.open(hh_path, "rt") as f:
        return [json.loads(next(f)) for _ in range(12)]


@pytest.fixture
def hh_file(tmp_path: Path, hh_rows: list[dict]) -> Path:
    return _write(tmp_path / "hh.jsonl", hh_rows[:8])


STORY = "Once upon a time there was a little cat. She liked to play in the sun."
SFT_FORMATS = {
    "prompt/response": lambda i: {"prompt": f"Tell me a story about a cat, number {i}.", "response": STORY},
    "instruction/output": lambda i: {"instruction": f"Write a story {i}.", "input": "about a dog" if i % 2 else "",
                                     "output": " " + STORY},
    "messages": lambda i: {"messages": [{"role": "user", "content": f"Tell me story {i}."},
                                        {"role": "assistant", "content": STORY}]},
}


@pytest.mark.parametrize("fmt", sorted(SFT_FORMATS))
def test_reference_vs_sample_on_sft_data(fmt: str, stories_dir: Path, tmp_path: Path, capsys, one_thread):
    rows = [SFT_FORMATS[fmt](i) for i in range(6)]
    src = _write(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    summary = _pairs(capsys, str(src), "--model", str(stories_dir), "--out", str(out), *GEN)
    pairs = _rows(out)
    assert summary["rows"] == 6 and summary["kept"] == len(pairs) == 6 and summary["dropped"] == {}
    assert summary["samples_generated"] == 6 and summary["rows_resumed"] == 0
    # training's reader (orpo audit reads as training reads) takes the file as it is
    assert summary["audit"]["pairs"] == 6
    assert summary["audit"]["format"] == ("conversational" if fmt == "messages" else "standard")
    assert not out.with_name(out.name + ".progress").exists()
    for i, p in enumerate(pairs):
        def text(r):
            return r if isinstance(r, str) else r[0]["content"]

        assert text(p["chosen"]).strip() == STORY
        assert text(p["rejected"]).strip() and text(p["rejected"]) != text(p["chosen"])
        assert p["source"] == {"file": str(src), "row": i + 1}
        assert p["strategy"] == "reference-vs-sample" and p["generator"] == str(stories_dir)
        assert p["scorer"] is None and p["seed"] == 0 and len(p["sample_seeds"]) == 1
        if fmt == "messages":
            assert p["prompt"] == rows[i]["messages"][:1]
            assert p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant"
        else:
            # the sample starts as the reference does: no pair differs by a leading space
            assert p["rejected"][:1].isspace() == p["chosen"][:1].isspace()


def test_reference_vs_sample_on_preference_pairs(hh_file: Path, hh_rows: list[dict], stories_dir: Path,
                                                 tmp_path: Path, capsys, one_thread):
    """A preference file's chosen response is the demonstration; its rejected one is never used."""
    out = tmp_path / "pairs.jsonl"
    summary = _pairs(capsys, str(hh_file), "--model", str(stories_dir), "--out", str(out), *GEN)
    pairs = _rows(out)
    assert summary["kept"] == len(pairs) == 8
    for row, p in zip(hh_rows, pairs, strict=False):
        assert row["chosen"] == p["prompt"] + p["chosen"]
        assert row["rejected"] != p["prompt"] + p["rejected"]
        assert p["rejected"].startswith(" ") and p["rejected"].strip()
    assert 0 <= summary["chosen_longer_share"] <= 1
    longer = sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs) / len(pairs)
    assert summary["chosen_longer_share"] == pytest.approx(longer)
    # orpo train reads the file as it is
    run = tmp_path / "run"
    config = Path(__file__).resolve().parents[1] / "examples" / "hh-stories260k.yaml"
    assert main(["train", str(config), f"model.name_or_path={stories_dir}", f"data.train={out}",
                 "data.eval_fraction=0.25", "data.max_length=128", "data.max_prompt_length=96",
                 f"train.output_dir={run}", "train.max_steps=2", "train.batch_size=2", "train.eval_every=2",
                 "train.save_every=null", "train.save_final=false"]) == 0
    assert (run / "metrics.jsonl").is_file()


@pytest.fixture(scope="module")
def reward_model(stories_dir: Path, tmp_path_factory) -> Path:
    """A tiny sequence-classification reward model (one label), random but fixed weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, num_labels=1, pad_token_id=2,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    folder = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(folder)
    return folder


def test_best_vs_worst_with_a_reward_model(hh_file: Path, reward_model: Path, stories_dir: Path,
                                           tmp_path: Path, capsys, one_thread):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "pairs.jsonl"
    args = [str(hh_file), "--model", str(stories_dir), "--out", str(out), "--strategy", "best-vs-worst",
            "--samples", "3", "--reward-model", str(reward_model), *GEN]
    summary = _pairs(capsys, *args)
    pairs = _rows(out)
    assert summary["samples_generated"] == 24 and summary["kept"] == len(pairs) > 0
    assert summary["kept"] + sum(summary["dropped"].values()) == 8
    gaps = []
    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model)
    for p in pairs:
        s = p["scores"]
        assert p["scorer"] == f"reward-model:{reward_model}" and len(p["sample_seeds"]) == 3
        assert s["chosen"] == max(s["samples"]) and s["rejected"] == min(s["samples"]) and s["chosen"] > s["rejected"]
        gaps.append(s["chosen"] - s["rejected"])
        # the reward model itself, on the text training sees (prompt + response), gives the recorded scores
        for key in ("chosen", "rejected"):
            with torch.no_grad():
                logit = model(**tokenizer(p["prompt"] + p[key], return_tensors="pt")).logits[0, 0]
            assert float(logit) == pytest.approx(s[key], abs=1e-4)
    assert summary["score_gap"]["min"] == pytest.approx(min(gaps))
    assert summary["score_gap"]["max"] == pytest.approx(max(gaps))

    # --min-gap above every gap drops them all, counted by reason, and writes an empty file
    high = _pairs(capsys, *args, "--min-gap", str(max(gaps) + 1), "--out", str(tmp_path / "none.jsonl"))
    assert high["kept"] == 0 and high["dropped"]["score gap below --min-gap"] == len(pairs)
    assert (tmp_path / "none.jsonl").read_text() == ""


# IFEval rows a 292k-parameter story model meets sometimes, by chance: no commas, all lowercase
IFEVAL_KEYS = {1001: "no_comma", 1019: "lowercase", 1051: "lowercase", 1087: "lowercase", 1162: "no_comma",
               1187: "no_comma", 1361: "lowercase"}


def test_best_vs_worst_with_ifeval_checks(shared_dir: Path, stories_dir: Path, tmp_path: Path, capsys, one_thread):
    rows = [json.loads(line) for line in (shared_dir / "data" / "ifeval" / "input_data.jsonl").open()]
    src = _write(tmp_path / "ifeval.jsonl", [r for r in rows if r["key"] in IFEVAL_KEYS])
    out = tmp_path / "pairs.jsonl"
    summary = _pairs(capsys, str(src), "--model", str(stories_dir), "--out", str(out), "--strategy",
                     "best-vs-worst", "--samples", "3", "--verify", "ifeval", "--max-new-tokens", "16",
                     "--chat-template", "none")
    pairs = _rows(out)
    assert summary["kept"] == len(pairs) > 0 and summary["kept"] + summary["dropped"].get("score tie", 0) == 7
    for p in pairs:
        kind = IFEVAL_KEYS[json.loads(src.read_text().splitlines()[p["source"]["row"] - 1])["key"]]
        assert p["scorer"] == "verify:ifeval" and p["scores"]["chosen"] == 1.0 and p["scores"]["rejected"] == 0.0
        follows = (lambda t: "," not in t) if kind == "no_comma" else (lambda t: t == t.lower())
        assert follows(p["chosen"]) and not follows(p["rejected"])

    # another row under --verify ifeval is named, before any model loads
    other = _write(tmp_path / "plain.jsonl", [{"prompt": "hi"}])
    assert main(["pairs", str(other), "--model", str(stories_dir), "--out", str(out), "--strategy", "best-vs-worst",
                 "--verify", "ifeval"]) == 2
    assert "plain.jsonl line 1: field 'instruction_id_list'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_judge(stories_dir: Path, tmp_path_factory) -> Path:
    """A tiny random Llama as judge: its verdicts depend on the answers (stories260K says "B" whatever they are)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.5)
    folder = tmp_path_factory.mktemp("judge")
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(folder)
    return folder


def test_judge_pairwise_with_a_local_judge(hh_file: Path, local_judge: Path, stories_dir: Path, tmp_path: Path,
                                           capsys, one_thread):
    from orpo.judge import build_judge, judge_both_orders

    out = tmp_path / "pairs.jsonl"
    summary = _pairs(capsys, str(hh_file), "--model", str(stories_dir), "--out", str(out), "--strategy",
                     "judge-pairwise", "--judge", str(local_judge), *GEN)
    pairs = _rows(out)
    assert summary["samples_generated"] == 16
    assert summary["kept"] == len(pairs) and summary["kept"] + summary["dropped"].get("judge tie", 0) == 8
    assert pairs, "the judge decided no pair: pick another seed for the judge's weights"
    judge = build_judge(str(local_judge), None)
    for p in pairs:
        s = p["scores"]
        assert p["scorer"] == f"judge:local:{local_judge}" and s["outcome"] in ("first", "second")
        assert (s["outcome"] == "first") == (s["chosen_sample"] == 0)
        # asked again with chosen first, the same judge picks it in both orders
        assert judge_both_orders(judge, [p["prompt"]], [p["chosen"]], [p["rejected"]])[0].outcome == "first"


def test_the_same_pairs_for_a_seed_whatever_the_batch_size(hh_file: Path, reward_model: Path, stories_dir: Path,
                                                           tmp_path: Path, capsys, one_thread):
    args = [str(hh_file), "--model", str(stories_dir), "--strategy", "best-vs-worst", "--samples", "2",
            "--reward-model", str(reward_model), *GEN]
    outs = {}
    for name, extra in {"a": ["--batch-size", "3"], "b": ["--batch-size", "3"], "c": ["--batch-size", "8"],
                        "other-seed": ["--seed", "1"]}.items():
        outs[name] = tmp_path / f"{name}.jsonl"
        _pairs(capsys, *args, *extra, "--out", str(outs[name]))
    assert outs["a"].read_bytes() == outs["b"].read_bytes() == outs["c"].read_bytes()
    assert outs["a"].read_bytes() != outs["other-seed"].read_bytes()


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "orpo.cli", "pairs", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_a_kill_mid_generation(hh_path: Path, stories_dir: Path, tmp_path: Path, capsys, one_thread):
    with gzip.open(hh_path, "rt") as f:
        src = _write(tmp_path / "hh.jsonl", [json.loads(next(f)) for _ in range(16)])
    args = [str(src), "--model", str(stories_dir), "--max-new-tokens", "48", "--chat-template", "none",
            "--batch-size", "1"]
    whole = tmp_path / "whole.jsonl"
    _pairs(capsys, *args, "--out", str(whole))

    out = tmp_path / "resumed.jsonl"
    progress = tmp_path / "resumed.jsonl.progress"
    proc = _cli(*args, "--out", str(out))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and progress.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it was killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = progress.read_bytes().count(b"\n") - 1
    assert 3 <= done < 16

    summary = _pairs(capsys, *args, "--out", str(out), "--json")
    assert summary["rows_resumed"] == done and summary["samples_generated"] == 16 - done
    assert out.read_bytes() == whole.read_bytes()
    assert not progress.exists()


def test_a_rerun_with_other_arguments_is_refused(hh_file: Path, stories_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "pairs.jsonl"
    progress = tmp_path / "pairs.jsonl.progress"
    header = {"orpo_pairs_progress": 1, "arguments": {"--seed": 5}}
    progress.write_text(json.dumps(header) + "\n")
    assert main(["pairs", str(hh_file), "--model", str(stories_dir), "--out", str(out), *GEN]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl.progress: an interrupted run with" in err and "rerun with the same arguments" in err
    assert not out.exists() and progress.read_text() == json.dumps(header) + "\n"


BAD = {
    "empty response": ([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": ""}],
                       "line 2: field 'response' must be non-empty text"),
    "no response": ([{"prompt": "a", "response": "b"}, {"prompt": "a"}], "line 2: no reference response"),
    "not JSON": (None, "line 2: malformed JSON"),
    "assistant only": ([{"messages": [{"role": "assistant", "content": "x"}]}],
                       "line 1: field 'messages': only an assistant turn"),
    "empty chosen": ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "", "rejected": "c"}],
                     "line 2: field 'chosen': empty response"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_are_named_and_nothing_is_written(case: str, stories_dir: Path, tmp_path: Path, capsys):
    rows, message = BAD[case]
    src = tmp_path / "demos.jsonl"
    if rows is None:
        src.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    else:
        _write(src, rows)
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", str(src), "--model", str(stories_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orpo pairs: error: ") and f"demos.jsonl {message}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demos.jsonl"]


def test_flags_that_do_not_fit_the_strategy(hh_file: Path, stories_dir: Path, tmp_path: Path, capsys):
    base = [str(hh_file), "--model", str(stories_dir), "--out", str(tmp_path / "p.jsonl")]
    for extra, words in [(["--strategy", "best-vs-worst"], "needs a scorer"),
                         (["--strategy", "judge-pairwise"], "needs --judge"),
                         (["--judge", str(stories_dir)], "are for --strategy judge-pairwise"),
                         (["--strategy", "best-vs-worst", "--verify", "ifeval", "--samples", "1"], "at least 2")]:
        assert main(["pairs", *base, *extra]) == 2
        assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hh.jsonl"]


def test_generator_url_through_a_real_server(model_server, hh_file: Path, stories_dir: Path, tmp_path: Path,
                                            capsys):
    from test_compare import _requests

    since = len(model_server.log.read_text(errors="replace"))
    out = tmp_path / "pairs.jsonl"
    summary = _pairs(capsys, str(hh_file), "--model", str(stories_dir), "--generator-url", model_server.url,
                     "--out", str(out), *GEN)
    pairs = _rows(out)
    assert summary["kept"] == len(pairs) >= 6 and summary["samples_generated"] == 8
    # one completion request per sample (each carries its own seed)
    assert [(p, c) for m, p, c in _requests(model_server.log, since) if m == "POST"] == [("/v1/completions", 200)] * 8
    for p in pairs:
        assert p["generator"] == f"{model_server.url} ({stories_dir})"
        assert p["rejected"].startswith(" ") and p["rejected"].strip()


def test_judge_pairwise_with_a_served_judge(model_server, verdict_judges, hh_file: Path, stories_dir: Path,
                                            tmp_path: Path, capsys, one_thread):
    """A judge that always answers "[[A]]" prefers no sample once both orders are asked: every row a tie."""
    out = tmp_path / "pairs.jsonl"
    src = _write(tmp_path / "three.jsonl", _rows(hh_file)[:3])
    summary = _pairs(capsys, str(src), "--model", str(stories_dir), "--out", str(out), "--strategy",
                     "judge-pairwise", "--judge-url", model_server.url, "--judge-model", str(verdict_judges["chat"]),
                     *GEN)
    assert summary["samples_generated"] == 6
    assert summary["kept"] == 0 and summary["dropped"] == {"judge tie": 3}
    assert out.read_text() == "" and summary["audit"] is None


def test_a_served_generator_that_does_not_sample_is_named(model_server, reward_model: Path, hh_file: Path,
                                                          stories_dir: Path, tmp_path: Path, capsys, one_thread):
    """`transformers serve` decodes greedily unless the model's generation config says do_sample: K seeds, one text."""
    out = tmp_path / "pairs.jsonl"
    args = [str(hh_file), "--model", str(stories_dir), "--generator-url", model_server.url, "--strategy",
            "best-vs-worst", "--samples", "2", "--reward-model", str(reward_model), *GEN]
    assert main(["pairs", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the server is not sampling" in err and '"do_sample": true' in err and not out.exists()

    sampling = tmp_path / "sampling-model"
    sampling.mkdir()
    for f in stories_dir.iterdir():
        (sampling / f.name).write_bytes(f.read_bytes())
    config = json.loads((sampling / "generation_config.json").read_text())
    (sampling / "generation_config.json").write_text(json.dumps({**config, "do_sample": True}))
    args[2] = str(sampling)
    first = _pairs(capsys, *args, "--out", str(tmp_path / "a.jsonl"))
    pairs = _rows(tmp_path / "a.jsonl")
    assert first["samples_generated"] == 16 and first["kept"] == len(pairs) > 0
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    # the server honours each sample's seed: the same file again
    _pairs(capsys, *args, "--out", str(tmp_path / "b.jsonl"))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_temperature_and_top_p_reach_the_sampler(hh_file: Path, stories_dir: Path, tmp_path: Path, capsys,
                                                 one_thread):
    """--temperature 0 is greedy decoding (`orpo generate`'s replies); a --top-p that keeps one token is too;
    the default temperature samples something else."""
    base = [str(hh_file), "--model", str(stories_dir), *GEN]
    outs = {name: tmp_path / f"{name}.jsonl" for name in ("greedy", "top-p", "sampled")}
    _pairs(capsys, *base, "--temperature", "0", "--out", str(outs["greedy"]))
    _pairs(capsys, *base, "--top-p", "1e-9", "--out", str(outs["top-p"]))
    _pairs(capsys, *base, "--out", str(outs["sampled"]))
    prompts = tmp_path / "prompts.jsonl"
    _write(prompts, [{"prompt": p["prompt"]} for p in _rows(outs["greedy"])])
    replies = tmp_path / "replies.jsonl"
    assert main(["generate", "--model", str(stories_dir), "--prompts", str(prompts), "--out", str(replies),
                 *GEN]) == 0
    greedy = [p["rejected"].strip() for p in _rows(outs["greedy"])]
    assert greedy == [json.loads(line)["completion"] for line in replies.read_text().splitlines()]
    assert [p["rejected"].strip() for p in _rows(outs["top-p"])] == greedy
    assert [p["rejected"].strip() for p in _rows(outs["sampled"])] != greedy


def test_an_out_file_orpo_did_not_write_is_never_replaced(hh_file: Path, stories_dir: Path, tmp_path: Path, capsys,
                                                          one_thread):
    """`orpo pairs`, `orpo generate` and `orpo compare` --out FILE.jsonl: an existing file is replaced only if
    its first row is one the command writes; a user's file, a link or a folder is refused before any model loads."""
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"prompt": "my own data", "chosen": "a", "rejected": "b"}\n')
    target = tmp_path / "target.jsonl"
    target.write_text("keep\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "Once upon a time"}])
    commands = {"pairs": ["pairs", str(hh_file), "--model", str(stories_dir), *GEN],
                "generate": ["generate", "--model", str(stories_dir), "--prompts", str(prompts), *GEN],
                "compare": ["compare", "--model", str(stories_dir), "--model", str(stories_dir), "--prompts",
                            str(prompts), "--judge", str(stories_dir), "--max-new-tokens", "12"]}
    for name, command in commands.items():
        for out, words in ((mine, "orpo did not write it"), (link, "not a regular file"),
                           (tmp_path, "a folder: name a file") if name != "compare" else (mine, "did not write")):
            capsys.readouterr()
            assert main([*command, "--out", str(out)]) == 2, (name, out)
            assert words in capsys.readouterr().err, (name, out)
        assert mine.read_text().startswith('{"prompt": "my own data"') and target.read_text() == "keep\n"
        # its own output, and an empty file, it replaces
        own = tmp_path / f"{name}.jsonl"
        own.write_text("")
        for _ in range(2):
            assert main([*command, "--out", str(own)]) == 0, name
        assert own.read_text().strip()
