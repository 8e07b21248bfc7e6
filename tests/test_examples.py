"""The shipped example configs and the quickstart's data and tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orpo.config import load_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
QUICKSTART = EXAMPLES / "quickstart"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))


def test_the_expected_configs_ship():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "smollm2-135m.yaml", "qwen2.5-0.5b.yaml", "llama3-8b-lora.yaml",
            "llama3-8b-qlora.yaml", "hh-stories260k.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_says_how_to_run_it(path: Path):
    load_config(path)
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#"), f"{path.name}: no header comment"
    assert f"orpo train examples/{path.name}" in header, f"{path.name}: the header does not show its command"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_local_paths_exist_from_the_repo_root(path: Path, request):
    """Relative paths in a config are relative to the repo root, where the command runs."""
    cfg = load_config(path)
    local = [p for p in (cfg.model.name_or_path, cfg.model.tokenizer, cfg.data.train, cfg.data.eval)
             if p and (p.startswith(("examples/", "../", "./")))]
    for p in local:
        if p.startswith("../shared/"):
            request.getfixturevalue("shared_dir")  # skips (or fails under ORPO_REQUIRE_SHARED) without it
        assert (REPO / p).exists(), f"{path.name}: {p} does not exist"


def test_quickstart_is_offline_and_small():
    cfg = load_config(EXAMPLES / "quickstart.yaml")
    assert cfg.model.init is not None and cfg.model.name_or_path is None
    assert cfg.model.chat_template is None, "the quickstart must exercise the tokenizer's own template"
    assert cfg.data.eval is not None and cfg.train.eval_every is not None
    assert cfg.train.output_dir == "runs/quickstart"


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name,count", [("train.jsonl", 2000), ("eval.jsonl", 200)])
def test_quickstart_data_is_standard_format(name: str, count: int):
    rows = _rows(QUICKSTART / name)
    assert len(rows) == count
    for i, r in enumerate(rows, 1):
        assert set(r) == {"prompt", "chosen", "rejected"}, f"{name} line {i}: keys {sorted(r)}"
        assert all(isinstance(v, str) and v.strip() for v in r.values()), f"{name} line {i}: empty field"
        assert r["chosen"] != r["rejected"], f"{name} line {i}: chosen == rejected"


def test_quickstart_eval_is_not_train():
    train = {tuple(r.values()) for r in _rows(QUICKSTART / "train.jsonl")}
    assert not train & {tuple(r.values()) for r in _rows(QUICKSTART / "eval.jsonl")}


def test_quickstart_pairs_have_no_length_shortcut():
    """Chosen is not systematically the longer (or shorter) response."""
    rows = _rows(QUICKSTART / "train.jsonl")
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows)
    shorter = sum(len(r["chosen"]) < len(r["rejected"]) for r in rows)
    assert abs(longer - shorter) < 0.1 * len(rows)


def test_generator_reproduces_the_committed_files(tmp_path: Path):
    subprocess.run([sys.executable, str(QUICKSTART / "make_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (QUICKSTART / name).read_bytes(), name
    committed = sorted(p.relative_to(QUICKSTART / "tokenizer") for p in (QUICKSTART / "tokenizer").rglob("*"))
    assert committed == sorted(p.relative_to(tmp_path / "tokenizer") for p in (tmp_path / "tokenizer").rglob("*"))
    for rel in committed:
        assert (tmp_path / "tokenizer" / rel).read_bytes() == (QUICKSTART / "tokenizer" / rel).read_bytes(), rel


@pytest.fixture(scope="module")
def quickstart_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QUICKSTART / "tokenizer"))


def test_tokenizer_special_tokens_and_template(quickstart_tokenizer):
    tok = quickstart_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    for special in ("<|im_start|>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    assert tok("Is 4 even or odd?")["input_ids"][0] == tok.bos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "Is 4 even or odd?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nIs 4 even or odd?<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_fits_the_quickstart_model(quickstart_tokenizer):
    cfg = load_config(EXAMPLES / "quickstart.yaml")
    assert cfg.model.init is not None
    assert cfg.model.init.model_dump()["vocab_size"] == len(quickstart_tokenizer)


def test_tokenizer_round_trips_the_data(quickstart_tokenizer):
    tok = quickstart_tokenizer
    rows = _rows(QUICKSTART / "train.jsonl") + _rows(QUICKSTART / "eval.jsonl")
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert tok.batch_decode(ids) == texts
    assert tok.unk_token_id not in {i for seq in ids for i in seq}
    # Short enough that quickstart's max_length never truncates: BOS + rendered conversation + EOS.
    convs = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r[k]}], tokenize=False)
             for r in rows for k in ("chosen", "rejected")]
    longest = max(len(seq) for seq in tok(convs)["input_ids"]) + 1
    assert longest <= load_config(EXAMPLES / "quickstart.yaml").data.max_length
