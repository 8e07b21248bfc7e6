"""``orpo compare`` end to end against a real OpenAI-compatible server (``transformers serve``) and a
local judge, the statistics it reports, and bad input refused before any model loads.

The served judge is stories260K trained to answer "[[A]]" to every comparison (``judge_model.py``):
its verdicts parse, and its position bias is total, so judging in both orders must make every
comparison a tie.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from orpo.cli import main
from orpo.compare import length_bin, tally, wilson
from orpo.judge import OneVerdict, combine, judge_messages, parse_verdict

PROMPTS = ["Tell me a story about a cat.", "Once upon a time there was a dog who", "Write about the sun.",
           "What did the little girl find in the park?", "Tell me about a red ball.", "Who is Tim's best friend?"]
GEN = ["--max-new-tokens", "16"]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def _compare(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["compare", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _requests(log: Path, since: int) -> list[tuple[str, str, int]]:
    """(method, path, status) of each request the server logged after byte ``since``."""
    text = log.read_text(errors="replace")[since:]
    return [(m, p, int(s)) for m, p, s in re.findall(r'"(GET|POST) (\S+) HTTP/1\.1" (\d{3})', text)]


def test_wilson_interval_known_values():
    # the roots of (p - x)^2 = z^2 x (1 - x) / n at z = 1.96, solved apart
    lo, hi = wilson(0.5, 10)
    assert lo == pytest.approx(0.236590, abs=1e-6) and hi == pytest.approx(0.763410, abs=1e-6)
    lo, hi = wilson(0.9, 100)
    assert lo == pytest.approx(0.825633, abs=1e-6) and hi == pytest.approx(0.944771, abs=1e-6)
    assert wilson(1.0, 5)[1] == 1.0 and wilson(0.0, 5)[0] == 0.0 and wilson(0.5, 0) == (0.0, 1.0)


def test_both_orders_cancel_position_bias_and_ties_count_half():
    a, b, tie = (OneVerdict(w, raw="") for w in ("A", "B", "tie"))
    # forward shows the first answer as A, backward as B
    assert combine(a, b) == "first" and combine(b, a) == "second"
    assert combine(a, a) == "tie" and combine(b, b) == "tie"
    assert combine(a, tie) == "first" and combine(tie, a) == "second" and combine(tie, tie) == "tie"
    t = tally(["A", "A", "A", "tie", "B"])
    assert (t["wins"], t["ties"], t["losses"]) == (3, 1, 1) and t["win_rate"] == pytest.approx(0.7)
    assert t["win_rate_ci95"] == list(wilson(0.7, 5))


def test_length_bins_and_verdict_parsing():
    # r = (chars A + 1) / (chars B + 1); both ends of "similar", 0.8 and 1.25, are in it
    assert length_bin(6, 9) == "A shorter" and length_bin(7, 9) == "similar" and length_bin(4, 3) == "similar"
    assert length_bin(99, 79) == "similar" and length_bin(100, 79) == "A longer"
    # the last verdict counts: an explanation may quote the format first
    assert parse_verdict('Use "[[A]]" or "[[B]]". Answer B is clearer. [[B]]').winner == "B"
    assert parse_verdict("[[C]]").winner == "tie"
    none = parse_verdict("I cannot decide.")
    assert none.winner == "tie" and not none.parsed
    text = judge_messages("Q?", "first answer", "second answer")[1]["content"]
    assert text.index("first answer") < text.index("## Answer B") < text.index("second answer")


def test_a_served_judge_without_chat_template_is_asked_by_completions(model_server, verdict_judges, stories_dir,
                                                                      prompts, tmp_path, capsys, one_thread):
    since = len(model_server.log.read_text(errors="replace"))
    out = tmp_path / "cmp"
    s = _compare(capsys, "--model", str(stories_dir), "--model", str(stories_dir), "--chat-template-b", "zephyr",
                 "--prompts", str(prompts), "--judge-url", model_server.url, "--judge-model",
                 str(verdict_judges["plain"]), "--judge-max-tokens", "16", "--out", str(out), *GEN)
    n = len(PROMPTS)
    assert s["n"] == n and s["judgments"] == 2 * n and s["unparsed_verdicts"] == 0
    assert (s["wins"], s["ties"], s["losses"]) == (0, n, 0)
    assert s["win_rate"] == 0.5 and s["win_rate_ci95"] == pytest.approx(list(wilson(0.5, n)))
    assert s["judge"] == f"endpoint:{model_server.url} ({verdict_judges['plain']})"
    # one chat request refused (no chat template), then every judgment, the first again, as a completion
    posts = [(p, code) for m, p, code in _requests(model_server.log, since) if m == "POST"]
    assert posts[0] == ("/v1/chat/completions", 400)
    assert posts[1:] == [("/v1/completions", 200)] * (2 * n)

    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(1, n + 1)) and [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        assert r["forward"]["winner"] == r["backward"]["winner"] == "A"
        assert r["forward"]["parsed"] and r["backward"]["parsed"] and "[[A]]" in r["forward"]["raw"]
        assert r["outcome"] == "tie" and r["length_bin"] == length_bin(len(r["answer_a"]), len(r["answer_b"]))
    assert json.loads((out / "summary.json").read_text()) == {k: v for k, v in s.items() if k != "out"}
    assert sum(b["n"] for b in s["length_bins"]) == n
    assert s["mean_length_a"]["chars"] == pytest.approx(sum(len(r["answer_a"]) for r in rows) / n)
    assert s["mean_length_a"]["tokens"] == pytest.approx(sum(r["tokens_a"] for r in rows) / n)
    assert 0 < s["mean_length_a"]["tokens"] <= 16

    # model A's answers are `orpo generate --prompts`' greedy answers, token for token
    generated = tmp_path / "generated.jsonl"
    assert main(["generate", "--model", str(stories_dir), "--prompts", str(prompts), "--out", str(generated),
                 *GEN]) == 0
    completions = [json.loads(line)["completion"] for line in generated.read_text().splitlines()]
    assert [r["answer_a"] for r in rows] == completions
    for line, r in zip(generated.read_text().splitlines(), rows, strict=True):
        # `generate` counts the EOS among the new tokens, compare does not
        new = json.loads(line)["new_tokens"]
        assert r["tokens_a"] == new - 1 if new < 16 else r["tokens_a"] in (15, 16)


def test_a_served_judge_with_a_chat_template_is_asked_by_chat(model_server, verdict_judges, stories_dir, prompts,
                                                               tmp_path, capsys, one_thread):
    since = len(model_server.log.read_text(errors="replace"))
    out = tmp_path / "answers.jsonl"
    s = _compare(capsys, "--model", str(stories_dir), "--model", str(stories_dir), "--chat-template-b", "chatml",
                 "--prompts", str(prompts), "--limit", "4", "--sample", "--seed", "3", "--judge-url", model_server.url,
                 "--judge-model", str(verdict_judges["chat"]), "--judge-max-tokens", "16", "--out", str(out), *GEN)
    assert s["n"] == 4 and s["ties"] == 4 and s["unparsed_verdicts"] == 0 and s["out"] == str(out)
    posts = [(p, code) for m, p, code in _requests(model_server.log, since) if m == "POST"]
    assert posts == [("/v1/chat/completions", 200)] * 8
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # each model its own template: B's prompts were rendered with chatml, so its answers differ
    assert len(rows) == 4 and any(r["answer_a"] != r["answer_b"] for r in rows)


def test_a_local_judge_scores_the_three_verdicts(verdict_judges, stories_dir, prompts, tmp_path, capsys,
                                                 one_thread):
    s = _compare(capsys, "--model", str(stories_dir), "--model", str(stories_dir), "--prompts", str(prompts),
                 "--limit", "3", "--judge", str(verdict_judges["plain"]), *GEN)
    # a model against itself: the same answers, so both orders are the same question: always a tie
    assert s["n"] == 3 and s["ties"] == 3 and s["win_rate"] == 0.5 and s["judge"].startswith("local:")
    from orpo.judge import build_judge

    judge = build_judge(str(verdict_judges["plain"]), None)
    got = judge.verdicts(["Q?"], ["an answer"], ["another answer"])[0]
    scores = [float(x) for x in re.findall(r"\[\[[ABC]\]\] (-?\d+\.\d+)", got.raw)]
    assert got.winner == "A" and len(scores) == 3 and scores[0] == max(scores)
    assert all(math.isfinite(x) and x <= 0 for x in scores)


def test_bad_input_is_refused_before_any_model_loads(stories_dir, prompts, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    base = ["compare", "--model", str(stories_dir), "--model", str(stories_dir)]
    for extra, words in [
        (["--prompts", str(bad), "--judge", str(stories_dir)], "bad.jsonl line 2: no prompt"),
        (["--prompts", str(prompts)], "name one judge"),
        (["--prompts", str(prompts), "--judge", str(stories_dir), "--judge-url", "http://127.0.0.1:9/v1"],
         "not both"),
        (["--prompts", str(prompts), "--judge-url", "ftp://x"], "not an http(s) URL"),
        (["--prompts", str(prompts), "--judge", str(stories_dir), "--out", str(foreign)], "notes.txt"),
        (["--prompts", str(prompts), "--judge", str(tmp_path / "nowhere")], "no such folder"),
        (["--prompts", str(prompts), "--judge", str(stories_dir), "--temperature", "0.5"], "are for --sample"),
    ]:
        capsys.readouterr()
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("orpo compare: error: ") and words in err, (extra, err)
    assert main(["compare", "--model", str(stories_dir), "--prompts", str(prompts), "--judge", str(stories_dir)]) == 2
    assert "exactly two models" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "mine", "prompts.jsonl"]
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_an_unreachable_judge_fails_before_any_answer_is_generated(stories_dir, prompts, tmp_path, capsys,
                                                                   monkeypatch):
    from served import free_port

    import orpo.compare

    monkeypatch.setattr("orpo.endpoint.BACKOFF_S", 0.01)
    called = []
    monkeypatch.setattr(orpo.compare, "generate_answers", lambda *a, **k: called.append(a))
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert main(["compare", "--model", str(stories_dir), "--model", str(stories_dir), "--prompts", str(prompts),
                 "--judge-url", url, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{url}/models: cannot reach the server" in err and not called
    assert not (tmp_path / "out").exists()
