"""Data and models in memory (notebooks): Dataset, DataFrame, list of dicts, a loaded model and tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orpo.config import Config, ConfigError, DataConfig, load_config
from orpo.data import DataError, prepare_data

REPO = Path(__file__).resolve().parents[1]
QS = REPO / "examples" / "quickstart"


def _rows(n: int = 24) -> list[dict]:
    with (QS / "train.jsonl").open() as f:
        return [json.loads(next(f)) for _ in range(n)]


def _tokenized(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


@pytest.fixture
def data_cfg(tmp_path) -> DataConfig:
    return DataConfig(max_length=64, cache_dir=str(tmp_path / "cache"))


def _as(kind: str, rows: list[dict]):
    if kind == "list":
        return rows
    if kind == "dataframe":
        import pandas as pd

        return pd.DataFrame(rows)
    import datasets

    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("kind", ["list", "dataframe", "dataset"])
def test_memory_rows_tokenize_like_the_same_file(kind, data_cfg, stories_tokenizer, tmp_path):
    rows = _rows()
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_file = prepare_data(data_cfg.model_copy(update={"train": str(path)}), stories_tokenizer, "chatml")
    in_memory = prepare_data(data_cfg, stories_tokenizer, "chatml", train_data=_as(kind, rows),
                             eval_data=_as(kind, rows[:4]))
    assert _tokenized(in_memory.train) == _tokenized(from_file.train)
    assert len(in_memory.eval) == 4
    s = in_memory.summary
    assert s.source == "train_data (in memory: 24 rows)" and s.eval_source == "eval_data (in memory: 4 rows)"
    assert s.format == "standard" and s.rows_read == 28 and s.kept == 28
    # the checks see the eval rows too: 4 duplicates of training pairs, and their prompts overlap
    assert s.checks["duplicates"] == {"count": 4, "examples": ["eval_data row 0", "eval_data row 1",
                                                              "eval_data row 2", "eval_data row 3"]}
    assert s.checks["eval_prompt_overlap"]["count"] == 4


def test_errors_name_the_row_by_its_index(data_cfg, stories_tokenizer):
    rows = _rows(10)
    rows[7] = {**rows[7], "rejected": None}
    with pytest.raises(DataError, match=r"^train_data row 7: field 'rejected': expected a string, got None"):
        prepare_data(data_cfg, stories_tokenizer, "chatml", train_data=rows)

    import pandas as pd

    frame = pd.DataFrame(_rows(10), index=[f"id{i}" for i in range(10)])
    frame.loc["id3", "chosen"] = float("nan")  # a missing value in pandas
    with pytest.raises(DataError, match=r"^train_data row id3: field 'chosen': expected a string, got None"):
        prepare_data(data_cfg, stories_tokenizer, "chatml", train_data=frame)

    skipped = prepare_data(data_cfg.model_copy(update={"on_bad_row": "skip"}), stories_tokenizer, "chatml",
                           train_data=frame)
    assert skipped.summary.kept == 9 and skipped.summary.first_errors[0].startswith("train_data row id3")

    with pytest.raises(DataError, match=r"train_data row 2: expected a dict, got str"):
        prepare_data(data_cfg, stories_tokenizer, "chatml", train_data=[rows[0], rows[1], "oops"])
    with pytest.raises(DataError, match=r"expected a datasets.Dataset, a pandas DataFrame or a list of dicts"):
        prepare_data(data_cfg, stories_tokenizer, "chatml", train_data={"prompt": ["a"]})


def test_list_columns_read_through_pandas_become_lists(data_cfg, stories_tokenizer, preference_dir):
    """`Dataset.to_pandas()` turns message lists into NumPy arrays; they must still read as messages."""
    import datasets

    with (preference_dir / "llamafactory_v1_dpo_demo_orca.jsonl").open() as f:
        ds = datasets.Dataset.from_list([json.loads(line) for line in f])
    prepared = prepare_data(data_cfg, stories_tokenizer, "chatml", train_data=ds.to_pandas())
    assert prepared.summary.format == "conversational" and prepared.summary.kept == 10


def test_dataset_dict_asks_for_a_split(data_cfg, stories_tokenizer):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(4))})
    with pytest.raises(DataError, match=r"pass one split, e.g. train_data=ds\['train'\]"):
        prepare_data(data_cfg, stories_tokenizer, "chatml", train_data=dd)


def test_cache_key_is_the_content(data_cfg, stories_tokenizer):
    rows = _rows()
    first = prepare_data(data_cfg, stories_tokenizer, "chatml", train_data=rows)
    again = prepare_data(data_cfg, stories_tokenizer, "chatml", train_data=[dict(r) for r in rows])
    assert again.from_cache and again.fingerprint == first.fingerprint
    changed = [dict(r) for r in rows]
    changed[5]["chosen"] += "!"
    other = prepare_data(data_cfg, stories_tokenizer, "chatml", train_data=changed)
    assert other.fingerprint != first.fingerprint and not other.from_cache


def test_memory_data_and_config_data_are_exclusive(data_cfg, stories_tokenizer):
    with pytest.raises(ConfigError, match="train_data was passed and data.train is set"):
        prepare_data(data_cfg.model_copy(update={"train": str(QS / "train.jsonl")}), stories_tokenizer, "chatml",
                     train_data=_rows())
    with pytest.raises(ConfigError, match="eval_data was passed and data.eval / data.eval_fraction is set"):
        prepare_data(data_cfg.model_copy(update={"eval_fraction": 0.1}), stories_tokenizer, "chatml",
                     train_data=_rows(), eval_data=_rows(2))
    with pytest.raises(ConfigError, match="no training data: set data.train"):
        prepare_data(data_cfg, stories_tokenizer, "chatml")


def test_config_without_data_or_model_sections_is_valid():
    cfg = load_config(raw={"train": {"max_steps": 2, "eval_every": 1}})
    assert cfg.data.train is None and cfg.model.name_or_path is None
    with pytest.raises(ConfigError, match="train.eval_every needs eval data"):  # a file config still checks early
        load_config(raw={"data": {"train": "x.jsonl"}, "train": {"eval_every": 1}})


# ------------------------------------------------------------------------------ a model object


def _train_cfg(tmp_path: Path, **model) -> Config:
    return load_config(raw={"model": {"chat_template": "chatml", **model},
                            "data": {"max_length": 64, "cache_dir": str(tmp_path / "cache")},
                            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4,
                                      "learning_rate": 1e-2, "eval_every": 2}})


@pytest.fixture
def stories(stories_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(stories_dir)), AutoTokenizer.from_pretrained(str(stories_dir))


def test_train_a_model_object_on_a_dataframe(stories, tmp_path, one_thread):
    import pandas as pd
    import torch

    from orpo.train import Trainer

    model, tok = stories
    before = model.model.embed_tokens.weight.detach().clone()
    trainer = Trainer(_train_cfg(tmp_path), model=model, tokenizer=tok, train_data=pd.DataFrame(_rows(16)),
                      eval_data=_rows(4), progress=False).setup()
    assert trainer.accelerator.unwrap_model(trainer.model) is model  # the object itself is trained
    result = trainer.train()
    assert result.steps == 2 and result.best_eval is not None
    assert not torch.equal(model.model.embed_tokens.weight, before)
    assert tok.pad_token is not None  # the tokenizer got a pad token like a loaded one
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 2]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_lora_and_dtype_apply_to_a_model_object(stories, tmp_path):
    import torch

    from orpo.train import Trainer
    from orpo.train.model import is_peft_model

    model, tok = stories
    cfg = _train_cfg(tmp_path, lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}, dtype="bfloat16")
    trainer = Trainer(cfg, model=model, tokenizer=tok, train_data=_rows(8), eval_data=_rows(2), progress=False)
    trainer.setup()
    built = trainer.accelerator.unwrap_model(trainer.model)
    assert is_peft_model(built) and built.peft_config["default"].r == 4
    assert sorted(built.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    assert {p.dtype for n, p in built.named_parameters() if "lora_" not in n} == {torch.bfloat16}


def test_loading_keys_with_a_model_object_are_refused(stories, tmp_path, stories_dir):
    from orpo.train import Trainer

    model, tok = stories
    cfg = _train_cfg(tmp_path, name_or_path=str(stories_dir), attn_implementation="eager")
    with pytest.raises(ConfigError, match=re.escape("model.name_or_path, model.attn_implementation would do nothing")):
        Trainer(cfg, model=model, tokenizer=tok, train_data=_rows(8), eval_data=_rows(2)).setup()
    assert not (tmp_path / "run").exists()


def test_no_model_anywhere_is_one_clear_error(tmp_path):
    from orpo.train import Trainer

    with pytest.raises(ConfigError, match="no model: set model.name_or_path"):
        Trainer(_train_cfg(tmp_path), train_data=_rows(8)).setup()


def test_eval_every_without_any_eval_data_fails_at_setup(stories, tmp_path):
    from orpo.train import Trainer

    model, tok = stories
    with pytest.raises(ConfigError, match="train.eval_every needs eval data"):
        Trainer(_train_cfg(tmp_path), model=model, tokenizer=tok, train_data=_rows(8)).setup()


# ------------------------------------------------------------------------------ the README example


def test_readme_notebook_example_runs(shared_dir, tmp_path, monkeypatch, capsys, one_thread):
    """The README's notebook example, run as written (outputs redirected to a temporary folder)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## In a notebook", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "train_data=" in code and "model=model" in code and "pd.DataFrame" in code
    code = code.replace('"runs/notebook"', repr(str(tmp_path / "notebook")))
    code = code.replace("../shared/", str(shared_dir) + "/")
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(code, "README.md (notebook example)", "exec"), namespace)
    assert (tmp_path / "notebook" / "final" / "model.safetensors").is_file()
    assert namespace["result"].steps > 0
    out = capsys.readouterr().out
    assert "rows / pairs" in out and "32 rows read, 32 valid pairs" in out and "model accuracy" in out  # the audit


def test_cli_without_data_train_exits_2(tmp_path, capsys):
    from orpo.cli import main

    path = tmp_path / "nodata.yaml"
    # (a tokenizer folder as model.name_or_path is refused as "a tokenizer only": model.tokenizer it is)
    path.write_text(f"model:\n  tokenizer: {QS / 'tokenizer'}\n  init: {{arch: llama}}\n")
    assert main(["preprocess", str(path)]) == 2
    assert "no training data: set data.train" in capsys.readouterr().err
