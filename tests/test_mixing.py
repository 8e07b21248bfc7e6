"""Dataset mixing: `data.train` as a list of sources, exact proportions, per-source counts, cache key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orpo.cli import main
from orpo.config import ConfigError, DataConfig, DataSource, load_config
from orpo.data import DataError, prepare_data
from orpo.data.pipeline import mixture_takes


def _write(path: Path, tag: str, n: int) -> str:
    rows = [{"prompt": f"{tag} question {i}?", "chosen": f"{tag} good answer {i}.", "rejected": f"{tag} bad {i}."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    return {"a": _write(tmp_path / "a.jsonl", "A", 100), "b": _write(tmp_path / "b.jsonl", "B", 60)}


def _sources_of(ds, tok) -> list[str]:
    """Which file each tokenized pair came from (its prompt starts with the file's tag)."""
    return [tok.decode(row["chosen_input_ids"][: row["chosen_prompt_len"]], skip_special_tokens=True).strip()[0]
            for row in ds]


def _prepare(cfg: DataConfig, tok, seed: int = 42):
    return prepare_data(cfg, tok, chat_template="none", seed=seed)


def test_weights_are_exact_shares_without_replacement(files, stories_tokenizer, tmp_path):
    cfg = DataConfig(train=[{"path": files["a"], "weight": 1}, {"path": files["b"], "weight": 3}], max_length=64,
                     cache_dir=str(tmp_path / "cache"))
    prepared = _prepare(cfg, stories_tokenizer)
    # s = min(100 / 1, 60 / 3) = 20 pairs per unit of weight: A gives 20, B (the limit) all of its 60
    assert _sources_of(prepared.train, stories_tokenizer).count("A") == 20
    assert _sources_of(prepared.train, stories_tokenizer).count("B") == 60
    texts = [tuple(r["chosen_input_ids"]) for r in prepared.train]
    assert len(set(texts)) == len(texts) == 80  # drawn without replacement
    counts = {c["name"]: (c["rows_read"], c["pairs"], c["mixed"], c["kept"]) for c in prepared.summary.sources}
    assert counts == {files["a"]: (100, 100, 20, 20), files["b"]: (60, 60, 60, 60)}
    text = prepared.summary.render()
    assert "Mixture" in text and "mixed in" in text

    same = _prepare(cfg.model_copy(update={"cache_dir": str(tmp_path / "other")}), stories_tokenizer)
    assert [r for r in same.train] == [r for r in prepared.train]  # deterministic given the seed
    reseeded = _prepare(cfg, stories_tokenizer, seed=7)
    assert reseeded.fingerprint != prepared.fingerprint
    assert [r for r in reseeded.train] != [r for r in prepared.train]  # another sample of A
    assert _sources_of(reseeded.train, stories_tokenizer).count("A") == 20


@pytest.mark.parametrize(
    ("available", "weights", "max_samples", "expected"),
    [
        ([100, 60], [1, 3], [None, None], [20, 60]),
        ([100, 60], [1, 1], [40, None], [40, 40]),  # max_samples caps A's pool first
        ([100, 60], [0.1, 0.3], [None, None], [20, 60]),  # float weights: no pair lost to rounding
        ([100, 60, 7], [2, 2, 1], [None, None, None], [14, 14, 7]),
        ([100, 60], [None, None], [10, None], [10, 60]),  # no weights: each source whole (or capped)
        ([100, 60], [3, 1], [None, None], [100, 33]),  # A is the limit: 100 / 3 per unit of weight
    ],
)
def test_mixture_takes(available, weights, max_samples, expected):
    settings = [DataSource(path=f"s{i}", weight=w, max_samples=m) for i, (w, m) in enumerate(zip(weights, max_samples,
                                                                                                strict=True))]
    assert mixture_takes(available, settings) == expected


def test_max_samples_per_source_and_formats_per_source(preference_dir, stories_tokenizer, tmp_path):
    share = str(preference_dir / "llamafactory_dpo_en_demo.json")
    orca = str(preference_dir / "llamafactory_v1_dpo_demo_orca.jsonl")
    stack = str(preference_dir / "torchtune_stack_exchange_paired_tiny.json")
    cfg = DataConfig(train=[{"path": share, "format": "sharegpt", "max_samples": 12}, orca,
                            {"path": stack, "columns": {"prompt": "question", "chosen": "response_j",
                                                        "rejected": "response_k"}}],
                     max_length=128, cache_dir=str(tmp_path))
    s = prepare_data(cfg, stories_tokenizer, chat_template="chatml").summary
    assert s.format == "sharegpt + conversational + columns"
    assert [(c["format"], c["rows_read"], c["mixed"]) for c in s.sources] == [
        ("sharegpt", 300, 12), ("conversational", 10, 10), ("columns", 25, 25)]
    assert s.rows_read == 335 and s.pairs == 47 and s.train_size == s.kept


def test_the_mixture_is_part_of_the_cache_key(files, stories_tokenizer, tmp_path):
    base = DataConfig(train=[{"path": files["a"], "weight": 1}, {"path": files["b"], "weight": 3}], max_length=64,
                      cache_dir=str(tmp_path))
    first = _prepare(base, stories_tokenizer)
    assert _prepare(base, stories_tokenizer).from_cache
    variants = [
        [{"path": files["a"], "weight": 1}, {"path": files["b"], "weight": 2}],
        [{"path": files["b"], "weight": 3}, {"path": files["a"], "weight": 1}],
        [{"path": files["a"], "weight": 1, "max_samples": 50}, {"path": files["b"], "weight": 3}],
        [{"path": files["a"]}, {"path": files["b"]}],
    ]
    fps = {first.fingerprint} | {_prepare(base.model_copy(update={"train": DataConfig(train=v).train}),
                                          stories_tokenizer).fingerprint for v in variants}
    assert len(fps) == 1 + len(variants)


def test_mixture_config_errors():
    with pytest.raises(ValueError, match="give every source of data.train a weight, or none"):
        DataConfig(train=[{"path": "a.jsonl", "weight": 1}, "b.jsonl"])
    with pytest.raises(ValueError, match="set max_samples per source"):
        DataConfig(train=["a.jsonl", "b.jsonl"], max_samples=10)
    with pytest.raises(ValueError, match="greater than 0"):
        DataConfig(train=[{"path": "a.jsonl", "weight": 0}])
    with pytest.raises(ValueError, match="empty list"):
        DataConfig(train=[])
    with pytest.raises(ConfigError, match=r"data.train.0.wieght: unknown key \(did you mean 'weight'\?\)"):
        load_config(raw={"model": {"name_or_path": "x"}, "data": {"train": [{"path": "a.jsonl", "wieght": 1}]}})


def test_unset_source_keys_inherit_data_keys():
    cfg = DataConfig(train=["a.jsonl", {"path": "org/name", "split": "dev"}], format="standard", train_split="tr",
                     subset="en")
    a, b = cfg.sources
    assert (a.format, a.split, a.subset) == ("standard", "tr", "en")
    assert (b.format, b.split, b.subset) == ("standard", "dev", "en")


def test_a_bad_row_names_its_source(files, tmp_path, stories_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n')
    cfg = DataConfig(train=[files["a"], str(bad)], max_length=64, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"bad.jsonl line 2: field 'rejected': missing"):
        _prepare(cfg, stories_tokenizer)


def test_cli_preprocess_shows_the_mixture(files, stories_dir, tmp_path, capsys):
    cfg = {"model": {"name_or_path": str(stories_dir), "chat_template": "none"},
           "data": {"train": [{"path": files["a"], "weight": 1}, {"path": files["b"], "weight": 1}], "max_length": 64,
                    "cache_dir": str(tmp_path / "cache")}}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["preprocess", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Mixture" in out and f"{Path(files['a']).name}" in out
    assert "120  (train 120, eval 0)" in out  # 60 + 60
