"""prepare_data end to end on the real files: HH (the TRL #6548 case), ShareGPT, Orca; cache; eval split."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from orpo.config import DataConfig
from orpo.data import DataError, PaddedLayout, prepare_data
from orpo.data.pipeline import DataSummary


def _rows(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def _check_rows(ds, max_length: int, min_response: int = 1) -> None:
    for row in _rows(ds):
        for side in ("chosen", "rejected"):
            ids, plen = row[f"{side}_input_ids"], row[f"{side}_prompt_len"]
            assert 0 < plen < len(ids) <= max_length
            assert len(ids) - plen >= min_response


def test_hh_with_max_length_512_keeps_a_response_in_every_pair(hh_path, stories_tokenizer, tmp_path):
    """Done-when of the issue: TRL gave empty completions (then NaN) on exactly this data.

    With the default on_bad_row (error): HH's four empty turns are dropped and counted, not fatal.
    """
    cfg = DataConfig(train=str(hh_path), max_length=512, cache_dir=str(tmp_path))
    prepared = prepare_data(cfg, stories_tokenizer, chat_template="none")
    s = prepared.summary
    _check_rows(prepared.train, 512)
    assert s.format == "implicit" and s.template == "none"
    assert s.rows_read == 1800 and s.kept == len(prepared.train) == s.train_size
    assert s.rows_read == s.kept + s.num_dropped
    assert s.num_dropped == 4 and all(k.startswith("bad row: ") for k in s.dropped)  # 4 empty responses
    assert s.lengths["prompt"].max > 512 and s.truncated > 0  # prompts alone longer than max_length exist
    text = s.render()
    assert "dropped" in text and f"{next(iter(s.dropped))}: 4" in text and "p99" in text

    # a stricter minimum on part of the data: the summary says how many went and why
    strict = cfg.model_copy(update={"min_response_tokens": 8, "max_samples": 600})
    s8 = prepare_data(strict, stories_tokenizer, chat_template="none").summary
    assert s8.pairs == 600 and s8.dropped["response_too_short"] > 0
    assert s8.kept == s8.pairs - s8.dropped["response_too_short"]


@pytest.mark.parametrize(
    ("name", "fmt", "rows"),
    [("llamafactory_dpo_en_demo.json", "sharegpt", 300), ("llamafactory_v1_dpo_demo_orca.jsonl", "conversational", 10)],
)
def test_structured_files_through_chatml(preference_dir, stories_tokenizer, tmp_path, name, fmt, rows):
    tok = stories_tokenizer
    cfg = DataConfig(train=str(preference_dir / name), max_length=512, cache_dir=str(tmp_path))
    prepared = prepare_data(cfg, tok, chat_template="chatml")
    assert prepared.summary.format == fmt and prepared.summary.kept == rows == len(prepared.train)
    _check_rows(prepared.train, 512)
    for row in _rows(prepared.train):
        c, r = row["chosen_input_ids"], row["rejected_input_ids"]
        assert c[: row["chosen_prompt_len"]] == r[: row["rejected_prompt_len"]]
        assert tok.decode(c[: row["chosen_prompt_len"]]).endswith("<|im_start|>assistant\n")
        assert c[0] == tok.bos_token_id and c.count(tok.bos_token_id) == 1
        for ids in (c, r):
            if len(ids) < 512:  # whole response: ends with the end of turn and one EOS
                assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
                assert tok.decode(ids[row["chosen_prompt_len"] :]).endswith("<|im_end|></s>")


def test_rows_feed_the_padded_layout(preference_dir, stories_tokenizer, tmp_path):
    cfg = DataConfig(train=str(preference_dir / "llamafactory_v1_dpo_demo_orca.jsonl"), max_length=256,
                     cache_dir=str(tmp_path))
    train = prepare_data(cfg, stories_tokenizer, chat_template="zephyr").train
    batch = PaddedLayout(pad_token_id=0)(_rows(train)[:4])
    assert batch.num_pairs == 4
    for seg in range(8):  # every chosen and rejected sequence has response targets
        assert (batch.response_mask & (batch.segment_ids == seg)).any()


def test_second_run_hits_the_cache_and_settings_change_the_key(preference_dir, stories_tokenizer, tmp_path):
    tok = stories_tokenizer
    src = tmp_path / "orca.jsonl"
    shutil.copy(preference_dir / "llamafactory_v1_dpo_demo_orca.jsonl", src)
    cache = tmp_path / "cache"
    cfg = DataConfig(train=str(src), max_length=256, cache_dir=str(cache))

    first = prepare_data(cfg, tok, chat_template="chatml")
    assert not first.from_cache and first.cache_path == cache / first.fingerprint
    assert sorted(p.name for p in cache.iterdir()) == [first.fingerprint]  # no temporary folders left
    assert sorted(p.name for p in first.cache_path.iterdir()) == ["summary.json", "train.arrow"]

    second = prepare_data(cfg, tok, chat_template="chatml")
    assert second.from_cache and second.fingerprint == first.fingerprint
    assert _rows(second.train) == _rows(first.train)
    assert second.summary == first.summary

    changed = {
        "max_length": prepare_data(cfg.model_copy(update={"max_length": 128}), tok, chat_template="chatml"),
        "template": prepare_data(cfg, tok, chat_template="zephyr"),
        "min_response_tokens": prepare_data(cfg.model_copy(update={"min_response_tokens": 2}), tok, "chatml"),
    }
    src.write_text(src.read_text().replace("Gorazde", "Goražde"))  # the data bytes
    changed["data"] = prepare_data(cfg, tok, chat_template="chatml")
    fingerprints = {first.fingerprint} | {p.fingerprint for p in changed.values()}
    assert len(fingerprints) == 1 + len(changed)
    assert not any(p.from_cache for p in changed.values())
    assert len(list(cache.iterdir())) == len(fingerprints)

    # an unreadable entry is rebuilt, not trusted
    (first.cache_path / "summary.json").write_text("{")
    cfg_orig = cfg.model_copy(update={"train": str(preference_dir / "llamafactory_v1_dpo_demo_orca.jsonl")})
    rebuilt = prepare_data(cfg_orig, tok, chat_template="chatml")
    assert rebuilt.fingerprint == first.fingerprint and not rebuilt.from_cache
    assert _rows(rebuilt.train) == _rows(first.train)


def test_eval_fraction_is_deterministic_and_disjoint(hh_path, stories_tokenizer, tmp_path):
    base = DataConfig(train=str(hh_path), max_length=128, on_bad_row="skip", max_samples=200,
                      eval_fraction=0.1, cache_dir=str(tmp_path))
    a = prepare_data(base, stories_tokenizer, chat_template="none", seed=1, use_cache=False)
    b = prepare_data(base, stories_tokenizer, chat_template="none", seed=1, use_cache=False)
    c = prepare_data(base, stories_tokenizer, chat_template="none", seed=2, use_cache=False)
    assert (len(a.train), len(a.eval)) == (180, 20) == (a.summary.train_size, a.summary.eval_size)
    assert _rows(a.eval) == _rows(b.eval) and _rows(a.train) == _rows(b.train)
    assert _rows(a.eval) != _rows(c.eval)
    key = lambda row: (tuple(row["chosen_input_ids"]), tuple(row["rejected_input_ids"]))  # noqa: E731
    assert not {key(r) for r in _rows(a.eval)} & {key(r) for r in _rows(a.train)}
    assert a.fingerprint != c.fingerprint  # the seed is part of the key when there is a split


def test_eval_file_and_num_proc(preference_dir, stories_tokenizer, tmp_path):
    orca = str(preference_dir / "llamafactory_v1_dpo_demo_orca.jsonl")
    cfg = DataConfig(train=str(preference_dir / "llamafactory_dpo_en_demo.json"), eval=orca, max_length=128,
                     max_samples=40, cache_dir=str(tmp_path))
    one = prepare_data(cfg, stories_tokenizer, chat_template="chatml", use_cache=False)
    two = prepare_data(cfg.model_copy(update={"num_proc": 2}), stories_tokenizer, chat_template="chatml",
                       use_cache=False)
    assert (len(one.train), len(one.eval)) == (40, 10)
    # max_samples stops reading the 300 training rows after 40 pairs; the 10 eval rows are all read
    assert one.summary.rows_read == 40 + 10 and one.summary.eval_source == orca
    assert _rows(one.train) == _rows(two.train) and _rows(one.eval) == _rows(two.eval)


def test_bad_rows_name_file_line_and_field(tmp_path, stories_tokenizer):
    path = tmp_path / "bad.jsonl.gz"
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": 3, "rejected": "e"}]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(train=str(path), max_length=64, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"bad.jsonl.gz line 2: field 'chosen'"):
        prepare_data(cfg, stories_tokenizer, chat_template="none")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    skipped = prepare_data(cfg.model_copy(update={"on_bad_row": "skip"}), stories_tokenizer, chat_template="none")
    assert skipped.summary.kept == 1 and skipped.summary.num_dropped == 1
    assert "line 2" in skipped.summary.first_errors[0]


def test_summary_round_trips(preference_dir, stories_tokenizer, tmp_path):
    cfg = DataConfig(train=str(preference_dir / "torchtune_stack_exchange_paired_tiny.json"), max_length=256,
                     cache_dir=str(tmp_path))
    s = prepare_data(cfg, stories_tokenizer, chat_template="llama3").summary
    assert s.format == "columns" and s.template == "llama3" and s.kept == 25
    assert DataSummary.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    lengths = s.lengths["sequence"]
    assert lengths.p50 <= lengths.p90 <= lengths.p99 <= lengths.max
    assert len(s.render().splitlines()) < 30
