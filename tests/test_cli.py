"""The `orpo` command line end to end on tiny runs: train, preprocess, eval, generate, merge, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orpo.cli import main

REPO = Path(__file__).resolve().parents[1]
QS = REPO / "examples" / "quickstart"


def _config(tmp_path: Path, **train) -> Path:
    cfg = {
        "model": {"init": {"arch": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64},
                  "tokenizer": str(QS / "tokenizer")},
        "data": {"train": str(QS / "train.jsonl"), "eval": str(QS / "eval.jsonl"), "max_length": 64,
                 "max_samples": 64},
        "orpo": {"lambda": 0.5},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 8, "learning_rate": 1e-3,
                  "eval_batch_size": 64, **train},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    assert main(["train", str(_config(tmp)), "train.max_steps=4", "train.eval_every=2"]) == 0
    return tmp / "run"


def test_train_writes_metrics_and_a_final_model(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]  # the override beat the YAML's max_steps
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    assert (trained / "final" / "model.safetensors").is_file()
    assert yaml.safe_load((trained / "config.yaml").read_text())["orpo"]["beta"] == 0.5  # `lambda` alias


def test_eval_json_matches_the_last_eval(trained, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(trained / "final"), "--data", str(QS / "eval.jsonl"),
                 "--max-length", "64", "--beta", "0.5", "--batch-size", "64", "--json"]) == 0
    out = capsys.readouterr()
    [result] = json.loads(out.out)
    assert {"model", "pairs", "accuracy", "logps_chosen", "logps_rejected", "log_odds_ratio", "margin",
            "nll"} <= set(result)
    assert result["model"] == str(trained / "final") and result["pairs"] == 200
    last = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
    assert result["accuracy"] == pytest.approx(last["eval_accuracy"])
    assert result["nll"] == pytest.approx(last["eval_nll_loss"], rel=1e-5)
    assert result["log_odds_ratio"] == pytest.approx(last["eval_log_odds_ratio"], rel=1e-4, abs=1e-6)
    assert result["margin"] == pytest.approx(last["eval_margin"], rel=1e-4, abs=1e-6)


def test_eval_compares_several_models_in_one_table_one_row_each(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other"  # the same model with a scaled LM head: other numbers
    model = AutoModelForCausalLM.from_pretrained(trained / "final")
    model.lm_head.weight.data *= 3.0
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(trained / "final").save_pretrained(other)
    args = ["eval", "--model", str(trained / "final"), "--model", str(other), "--data", str(QS / "eval.jsonl"),
            "--max-length", "64", "--batch-size", "64"]
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == [str(trained / "final"), str(other)]
    assert rows[0]["pairs"] == rows[1]["pairs"] == 200 and rows[0]["nll"] != pytest.approx(rows[1]["nll"])
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table.count("accuracy") == 1 and "other" in table  # one header, one row per model
    assert f"{rows[1]['accuracy']:.4f}" in table


def test_generate_prints_a_reply(trained, capsys):
    capsys.readouterr()
    assert main(["generate", "--model", str(trained / "final"), "--prompt", "What is 2 plus 3?",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_preprocess_prints_the_summary_and_trains_nothing(tmp_path, capsys):
    assert main(["preprocess", str(_config(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "rows read" in out and "p99" in out and "standard" in out
    assert not (tmp_path / "run").exists()


def test_config_errors_exit_2_with_the_key_path(tmp_path, capsys):
    assert main(["train", str(_config(tmp_path)), "train.batch_sise=4"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_sise: unknown key (did you mean 'batch_size'?)" in err and "Traceback" not in err
    assert main(["train", str(_config(tmp_path)), "data.max_prompt_length=64"]) == 2
    assert "max_prompt_length (64) must be below max_length (64)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_data_exits_2_naming_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    assert main(["train", str(_config(tmp_path)), f"data.train={bad}", "data.eval=null"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 2: field 'chosen': expected a string, got int" in err
    assert not (tmp_path / "run" / "final").exists()  # no partial output that looks complete
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", \n')
    assert main(["preprocess", str(_config(tmp_path)), f"data.train={bad}"]) == 2
    assert "bad.jsonl line 2: malformed JSON" in capsys.readouterr().err


def test_train_help_points_to_the_configuration_reference(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "docs/configuration.md" in capsys.readouterr().out


def test_merge_writes_a_full_model(tmp_path, capsys):
    cfg = _config(tmp_path, max_steps=2)
    assert main(["train", str(cfg), "model.lora.r=4", "data.eval=null"]) == 0
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file()
    assert main(["merge", str(final), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert "merged model written to" in capsys.readouterr().out
