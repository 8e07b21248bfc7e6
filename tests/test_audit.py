"""`orpo audit` and the cheap data checks: planted faults with known counts, the JSON contract, exit statuses."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from orpo.cli import main
from orpo.data.checks import char_difference, leak_markers, near_identical
from orpo.data.templates import ChatTemplate, builtin_template

REPO = Path(__file__).resolve().parents[1]
QS = REPO / "examples" / "quickstart"

# The contract: `orpo audit --json` has exactly these keys (issue 11), plus the three that say how
# to read them (source, format, template, row_numbers, max_length) and the mean lengths' names.
CONTRACT_KEYS = {
    "rows", "pairs", "dropped", "duplicates", "identical_pairs", "conflicting_pairs", "near_identical_pairs",
    "empty_responses", "template_leaks", "control_chars", "chosen_longer_share", "truncated_share",
    "dropped_by_truncation", "eval_prompt_overlap", "accuracy",
}
EXTRA_KEYS = {"source", "format", "template", "row_numbers", "max_length", "mean_chosen_length",
              "mean_rejected_length", "length_unit", "label_noise_candidates", "definitions"}
BASE = "The quick brown fox jumps over the lazy dog while the cat sleeps on a warm and sunny windowsill."  # 96 chars


def _row(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _planted() -> list[dict | None]:
    """Rows with known faults; None is a blank line (so line numbers differ from row numbers)."""
    near = BASE.replace("quick", "quack")  # 2 of 96 characters changed: 2% differ
    far = BASE.replace("quick brown", "slow grey").replace("lazy", "tired")  # well over 5%
    return [
        _row("What is two plus two?", "Four.", "Five, I believe."),  # line 1: clean
        _row("Name a colour.", "Blue is a colour.", "Seven."),  # line 2: clean
        _row("  What is two plus two?\n", " Four.", "Five, I believe.  "),  # line 3: duplicate of line 1
        None,  # line 4: blank
        _row("What is two plus two?", "Four.", "Five, I believe."),  # line 5: duplicate of line 1 again
        _row("Say hi.", "hi", "  hi \n"),  # line 6: identical after stripping
        _row("Say bye.", "bye", "bye"),  # line 7: exactly identical -> training drops it (bad row)
        _row("Is the sky blue?", "Yes, on a clear day.", "No, it is always green."),  # line 8: conflict ...
        _row("Is the sky blue?", "No, it is always green.", "Yes, on a clear day."),  # line 9: ... with line 8
        _row("Describe the scene.", BASE, near),  # line 10: near-identical
        _row("Describe it again.", BASE, far),  # line 11: different enough
        _row("Say something.", "Something.", "   "),  # line 12: empty response -> dropped (bad row)
        _row("Greet me.", "Hello!<|im_end|>\n<|im_start|>user\nmore", "Go away."),  # line 13: chatml leak
        _row("Tell a story.", "Once upon a time.\n\nHuman: and then?", "No."),  # line 14: HH transcript leak
        _row("Spell bell.", "b\x07ell", "bel"),  # line 15: control character (BEL)
    ]


def _write_jsonl(path: Path, rows: list[dict | None]) -> Path:
    path.write_text("".join((json.dumps(r) if r is not None else "") + "\n" for r in rows))
    return path


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "planted.jsonl", _planted())


def _audit_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["audit", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_planted_fault_is_counted_exactly(planted, capsys):
    out = _audit_json(capsys, str(planted), "--chat-template", "chatml")
    assert out["rows"] == 14 and out["pairs"] == 12 and out["row_numbers"] == "line"
    assert out["dropped"] == {"bad row: chosen == rejected": 1, "bad row: empty response": 1}
    expected = {
        "duplicates": [3, 5],
        "identical_pairs": [6, 7],
        "conflicting_pairs": [8, 9],
        "near_identical_pairs": [10],
        "empty_responses": [12],
        "template_leaks": [13, 14],
        "control_chars": [15],
    }
    for key, lines in expected.items():
        assert out[key] == {"count": len(lines), "examples": lines}, key
    valid = [r for r in _planted() if r is not None and r["rejected"].strip() and r["chosen"] != r["rejected"]]
    assert len(valid) == 12
    assert out["chosen_longer_share"] == pytest.approx(sum(len(r["chosen"]) > len(r["rejected"]) for r in valid) / 12)
    assert out["mean_chosen_length"] == pytest.approx(sum(len(r["chosen"]) for r in valid) / 12)
    assert out["length_unit"] == "characters"
    assert out["truncated_share"] is None and out["dropped_by_truncation"] is None  # no tokenizer
    assert out["eval_prompt_overlap"] is None and out["accuracy"] is None and out["label_noise_candidates"] is None


def test_json_has_exactly_the_contract_keys(planted, capsys):
    out = _audit_json(capsys, str(planted))
    assert set(out) == CONTRACT_KEYS | EXTRA_KEYS
    for key in ("duplicates", "identical_pairs", "conflicting_pairs", "near_identical_pairs", "empty_responses",
                "template_leaks", "control_chars"):
        assert set(out[key]) == {"count", "examples"}


def test_examples_stop_at_five_and_json_rows_are_one_based(tmp_path, capsys):
    rows = [_row("Same prompt?", "Same answer.", "Other answer.") for _ in range(8)]
    path = tmp_path / "dups.json"
    path.write_text(json.dumps(rows))
    out = _audit_json(capsys, str(path))
    assert out["row_numbers"] == "row"
    assert out["duplicates"] == {"count": 7, "examples": [2, 3, 4, 5, 6]}


def test_eval_prompt_overlap_names_eval_lines(planted, tmp_path, capsys):
    evalset = _write_jsonl(tmp_path / "eval.jsonl", [
        _row("A new question?", "Yes.", "No."),
        _row("  Name a colour. ", "Red.", "Nine."),  # in train (line 2), whitespace aside
        _row("Is the sky blue?", "Often.", "Never."),  # in train (lines 8, 9)
    ])
    out = _audit_json(capsys, str(planted), "--eval", str(evalset))
    assert out["eval_prompt_overlap"] == {"count": 2, "examples": [2, 3]}
    assert out["rows"] == 14  # the eval file is not part of the audited rows
    assert main(["audit", str(planted), "--eval", str(evalset)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "eval prompts also in train" in x)
    assert "66.7%" in line  # 2 of the 3 eval pairs, not of the 12 training pairs


def test_text_report_fits_a_screen_and_names_what_it_found(planted, capsys):
    capsys.readouterr()
    assert main(["audit", str(planted), "--chat-template", "chatml"]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 30 and max(len(line) for line in text.splitlines()) <= 110
    assert "duplicate pairs" in text and "3, 5" in text and "found: dropped rows, duplicate pairs" in text


def test_a_malformed_line_is_a_counted_bad_row(tmp_path, capsys):
    """A JSON Lines file cut short is bad rows like any other: counted and named, never fatal here."""
    broken = _write_jsonl(tmp_path / "broken.jsonl", [_row("a", "b", "c"), _row("d", "e", "f")])
    broken.write_text(broken.read_text() + '{"prompt": \n')
    out = _audit_json(capsys, str(broken))
    assert out["rows"] == 3 and out["pairs"] == 2 and out["dropped"] == {"bad row: malformed JSON": 1}
    capsys.readouterr()
    assert main(["audit", str(broken)]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the table wraps long paths
    assert "broken.jsonl line 3: malformed JSON" in text and "found: dropped rows" in text


def test_bad_input_exits_2_with_one_message(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": ')
    cases = [
        ([str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        ([str(broken)], "broken.json: malformed JSON"),  # a whole .json file that does not parse
        ([str(QS / "train.jsonl"), "--max-length", "64"], "--max-length counts tokens: give --model"),
        ([str(QS / "train.jsonl"), "--chat-template", "nosuch"], "unknown chat template 'nosuch'"),
        ([str(QS / "train.jsonl"), "--model", str(tmp_path / "nomodel")], "--model"),
        ([str(QS / "train.jsonl"), "--format", "sharegpt"], "field 'conversations'"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["audit", *args, "--json"]) == 2, args
        out = capsys.readouterr()
        assert out.out == "" and message in out.err and "Traceback" not in out.err, (args, out.err)


def test_columns_flag_maps_any_three_columns(tmp_path, capsys):
    path = tmp_path / "cols.csv"
    path.write_text("q,good,bad\nWhy?,Because.,Because.\nHow?,Like this.,Like that.\n")
    out = _audit_json(capsys, str(path), "--columns", "q", "good", "bad")
    assert out["format"] == "columns" and out["pairs"] == 1 and out["identical_pairs"]["examples"] == [1]


# ------------------------------------------------------------------------------ with a model


STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun."
NOISE = "zq xv kj qq wv zx jq vk xz qj"


@pytest.fixture(scope="module")
def scored(stories_dir, tmp_path_factory):
    """Stories260K prefers a TinyStories sentence to letter noise: two rows have the labels swapped."""
    rows = [_row(f"Tell me story number {i}.", STORY, NOISE) for i in range(6)]
    rows[2] = _row("Tell me story number 2.", NOISE, STORY)
    rows[4] = _row("Tell me story number 4.", NOISE + " " + NOISE, STORY)
    path = _write_jsonl(tmp_path_factory.mktemp("scored") / "scored.jsonl", rows)
    return path


def test_model_accuracy_and_label_noise_candidates(scored, stories_dir, capsys, one_thread):
    out = _audit_json(capsys, str(scored), "--model", str(stories_dir), "--max-length", "64", "--chat-template",
                      "none")
    assert out["length_unit"] == "tokens" and out["max_length"] == 64
    assert out["accuracy"] == pytest.approx(4 / 6)
    candidates = out["label_noise_candidates"]
    assert sorted(c["row"] for c in candidates) == [3, 5]  # file lines of the swapped rows, and only them
    assert candidates[0]["log_odds_ratio"] <= candidates[1]["log_odds_ratio"] < 0


def test_model_accuracy_matches_orpo_eval(scored, stories_dir, capsys, one_thread):
    """The audit's accuracy is the same number training's evaluation reports on the same pairs."""
    audit = _audit_json(capsys, str(scored), "--model", str(stories_dir), "--max-length", "64")
    capsys.readouterr()
    assert main(["eval", "--model", str(stories_dir), "--data", str(scored), "--max-length", "64", "--json"]) == 0
    (evaluated,) = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(audit["accuracy"])


@pytest.mark.parametrize("kind", ["list", "dataframe", "dataset", "named index"])
def test_rows_in_memory_are_audited_by_index(kind):
    """The planted faults given as rows in memory: the same counts, examples named by index (0-based)."""
    import datasets
    import pandas as pd

    from orpo.data.audit import audit

    rows = [r for r in _planted() if r is not None]  # line n of the file is index n - 1 here, n - 2 past line 4
    data = {"list": rows, "dataframe": pd.DataFrame(rows), "dataset": datasets.Dataset.from_list(rows),
            "named index": pd.DataFrame(rows, index=[f"id{i}" for i in range(len(rows))])}[kind]
    out = audit(data, chat_template="chatml").to_json()
    assert out["row_numbers"] == "index" and out["rows"] == 14 and out["pairs"] == 12
    name = (lambda i: f"id{i}") if kind == "named index" else (lambda i: i)  # noqa: E731
    expected = {"duplicates": [2, 3], "identical_pairs": [4, 5], "conflicting_pairs": [6, 7],
                "near_identical_pairs": [8], "empty_responses": [10], "template_leaks": [11, 12], "control_chars": [13]}
    for key, indices in expected.items():
        assert out[key] == {"count": len(indices), "examples": [name(i) for i in indices]}, key


def test_a_loaded_model_and_tokenizer_score_rows_in_memory(scored, stories_dir, one_thread):
    """The notebook path: model and tokenizer objects (stories260K's tokenizer has no pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orpo.data.audit import audit

    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(str(stories_dir))
    assert tokenizer.pad_token is None
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir))
    report = audit(rows, model=model, tokenizer=tokenizer, chat_template="none", max_length=64)
    assert report.accuracy == pytest.approx(4 / 6)
    assert sorted(c["row"] for c in report.label_noise_candidates or []) == [2, 4]  # the swapped rows' indices


def test_truncation_share_and_drops_are_exact(tmp_path, stories_tokenizer, capsys):
    long_prompt = " ".join(["word"] * 60)
    rows = [
        _row("Short?", "Yes it is short.", "No it is long."),  # fits
        _row(long_prompt, "Yes it is short.", "No it is long."),  # prompt cut
        _row(long_prompt, " ".join(["yes"] * 30), " ".join(["no"] * 30)),  # prompt + responses cut
    ]
    path = _write_jsonl(tmp_path / "long.jsonl", rows)
    from orpo.data.audit import audit

    report = audit(str(path), tokenizer=stories_tokenizer, chat_template="none", max_length=48)
    assert report.checks["truncated_share"] == pytest.approx(2 / 3)
    assert report.checks["dropped_by_truncation"] == {"count": 0, "examples": []}
    strict = audit(str(path), tokenizer=stories_tokenizer, chat_template="none", max_length=48,
                   max_prompt_length=32, min_response_tokens=20)
    # line 3: its responses (>= 20 tokens) get only 16 after a 32-token prompt -> dropped by truncation;
    # lines 1-2: responses shorter than 20 tokens even whole -> response_too_short, not truncation
    assert strict.checks["dropped_by_truncation"] == {"count": 1, "examples": [3]}
    assert strict.dropped == {"response_too_short": 2, "no_room_for_response": 1}


# ------------------------------------------------------------------------------ the checks themselves


def _lcs(a: str, b: str) -> int:
    """The longest common subsequence by the textbook dynamic program: the reference the fast check must equal."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, start=1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def test_near_identical_equals_its_definition_on_random_edits():
    """The bounded, bit-parallel check decides every pair as the plain definition does, on both sides
    of the threshold and at it: unmatched characters < 5% of both texts' characters."""
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his".split()
    seen = {True: 0, False: 0}
    for _ in range(600):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 80)))
        b = list(a)
        for _ in range(rng.randint(0, max(1, len(a) // 25) * 3)):
            i = rng.randrange(len(b) + 1)
            op = rng.random()
            if op < 0.33 and b:
                del b[min(i, len(b) - 1)]
            elif op < 0.66:
                b.insert(i, rng.choice("abxyz "))
            elif b:
                b[min(i, len(b) - 1)] = rng.choice("abxyz ")
        other = "".join(b)
        total = len(a) + len(other)
        truth = total - 2 * _lcs(a, other) < 0.05 * total
        assert near_identical(a, other) == truth, (a, other)
        assert char_difference(a, other) == pytest.approx((total - 2 * _lcs(a, other)) / total)
        seen[truth] += 1
    assert min(seen.values()) > 100  # both sides of the threshold were exercised
    # at the threshold exactly: 2 unmatched of 40 characters is 5%, not under it; 1 of 40 is
    assert not near_identical("a" * 19 + "b", "a" * 19 + "c") and near_identical("a" * 20, "a" * 19)


def test_char_difference_is_the_unmatched_share():
    assert char_difference("abcd", "abcd") == 0.0
    assert char_difference("abcd", "abXd") == pytest.approx(0.25)  # 6 of 8 characters matched
    assert char_difference("abcd", "wxyz") == 1.0


def test_leak_markers_of_each_template(stories_tokenizer):
    plain = leak_markers(ChatTemplate("none", None))
    assert {"\n\nHuman:", "\n\nAssistant:", "\n\nUser:", "\n\nSystem:"} <= set(plain)
    assert {"<|im_start|>", "<|im_end|>"} <= set(leak_markers(builtin_template("chatml")))
    assert {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= set(leak_markers(builtin_template("llama3")))
    zephyr = set(leak_markers(builtin_template("zephyr"), stories_tokenizer))
    assert {"<|user|>", "<|assistant|>", "<|system|>", "</s>", "<s>"} <= zephyr  # + the tokenizer's specials
    assert not {m for m in zephyr if m.strip() in ("user", "assistant", "system", "")}  # no bare role words


# ------------------------------------------------------------------------------ in `orpo train`


def test_train_prints_the_checks_and_a_cached_run_shows_them_again(planted, tmp_path, capsys, one_thread):
    import yaml

    cfg = {
        "model": {"init": {"arch": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64},
                  "tokenizer": str(QS / "tokenizer")},
        "data": {"train": str(planted), "max_length": 64, "on_bad_row": "skip", "cache_dir": str(tmp_path / "c")},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 4, "overwrite": True},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runs = []
    for _ in range(2):
        capsys.readouterr()
        assert main(["train", str(path)]) == 0
        runs.append(capsys.readouterr().err)
    assert "reusing cache" not in runs[0] and "reusing cache" in runs[1]
    for err in runs:
        table = err[err.index("Data checks") :]
        for label, examples in [("duplicate pairs", "line 3, line 5"), ("chosen == rejected", "line 6, line 7"),
                                ("conflicting (swapped)", "line 8, line 9"), ("near-identical", "line 10"),
                                ("empty responses", "line 12"), ("template markup in responses", "line 13, line 14"),
                                ("control characters", "line 15")]:
            line = next(x for x in table.splitlines() if label in x)
            assert examples in line, line
        assert "chosen longer" in table and "mean tokens" in table
    strip = lambda text: text[text.index("Data checks") : text.index("model:")]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])


def test_pairs_are_scored_longest_first_and_returned_in_dataset_order(stories_dir, one_thread):
    """Batches of similar lengths (no batch padded to a random long pair), per-pair values in row order."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    from orpo.data.collate import PaddedLayout
    from orpo.train.evaluate import pair_logps

    g = torch.Generator().manual_seed(0)
    rows = []
    for n in [5, 40, 9, 33, 12, 27, 3, 18]:  # pair lengths in file order: short and long mixed
        prompt, chosen, rejected = (torch.randint(1, 512, (k,), generator=g).tolist() for k in (4, n, n + 2))
        rows.append({"chosen_input_ids": prompt + chosen, "chosen_prompt_len": 4,
                     "rejected_input_ids": prompt + rejected, "rejected_prompt_len": 4})
    dataset = datasets.Dataset.from_list(rows)
    seen: list[list[int]] = []

    class Recording(PaddedLayout):
        def __call__(self, batch_rows):
            seen.append([len(r["chosen_input_ids"]) - 4 for r in batch_rows])
            return super().__call__(batch_rows)

    model = AutoModelForCausalLM.from_pretrained(str(stories_dir))
    chosen, rejected = pair_logps(model, dataset, Recording(pad_token_id=0), batch_size=3)
    assert seen == [[40, 33, 27], [18, 12, 9], [5, 3]]
    one_by_one = [pair_logps(model, dataset.select([i]), 0, batch_size=1) for i in range(len(rows))]
    assert torch.allclose(chosen, torch.cat([c for c, _ in one_by_one]), atol=1e-5)
    assert torch.allclose(rejected, torch.cat([r for _, r in one_by_one]), atol=1e-5)


def test_orpo_eval_takes_the_fastest_exact_layout_and_agrees_with_padded(scored, stories_dir, capsys, one_thread):
    args = ["eval", "--model", str(stories_dir), "--data", str(scored), "--max-length", "64", "--json"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert f"{stories_dir}: layout: packed_shared_prompt (data.layout auto)" in out.err
    (auto,) = json.loads(out.out)
    assert main([*args, "--layout", "padded"]) == 0
    out = capsys.readouterr()
    assert f"{stories_dir}: layout: padded" in out.err
    (padded,) = json.loads(out.out)
    assert auto.keys() == padded.keys()
    for key, value in padded.items():
        assert auto[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-4, abs=1e-5)), key
