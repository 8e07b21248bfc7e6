"""Configuration: the issue's YAML as written, errors with key paths, overrides, docs in sync."""

from __future__ import annotations

from pathlib import Path

import pytest

from orpo.config import Config, ConfigError, config_doc, load_config

REPO = Path(__file__).resolve().parents[1]

ISSUE_YAML = """\
model:
  name_or_path: ../shared/assets/stories260K/hf   # or a hub name, or `init:` for a fresh model
  dtype: float32
  chat_template: none          # tokenizer's own when omitted; none | chatml | llama3 | zephyr | path.jinja
data:
  train: ../shared/data/hh-rlhf/harmless-dev.jsonl.gz
  eval_fraction: 0.05          # or `eval: FILE`
  max_length: 512
  max_prompt_length: 384
orpo:
  beta: 0.1
train:
  output_dir: runs/hh-stories
  max_steps: 30
  batch_size: 8                # pairs per micro-batch
  grad_accum: 1
  learning_rate: 8.0e-6
  eval_every: 10
  save_every: 10
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_issue_yaml_validates_as_written(tmp_path):
    cfg = load_config(_write(tmp_path, ISSUE_YAML))
    assert cfg.model.chat_template == "none" and cfg.data.max_prompt_length == 384
    assert cfg.orpo.beta == 0.1 and cfg.train.learning_rate == 8e-6 and cfg.train.save_every == 10


def test_lambda_is_an_alias_of_beta(tmp_path):
    cfg = load_config(_write(tmp_path, ISSUE_YAML.replace("beta: 0.1", "lambda: 0.25")))
    assert cfg.orpo.beta == 0.25


def test_dotted_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(_write(tmp_path, ISSUE_YAML), ["train.max_steps=7", "orpo.beta=0.5",
                                                     "train.report_to=[tensorboard]", "model.lora.r=4"])
    assert cfg.train.max_steps == 7 and cfg.orpo.beta == 0.5 and cfg.train.report_to == ["tensorboard"]
    assert cfg.model.lora is not None and cfg.model.lora.r == 4 and cfg.model.lora.alpha == 32.0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_stpes=5", r"train\.max_stpes: unknown key \(did you mean 'max_steps'\?\)"),
        ("train.batch_size=eight", r"train\.batch_size: Input should be a valid integer"),
        ("data.max_prompt_length=512", r"data: max_prompt_length \(512\) must be below max_length \(512\)"),
        ("train.warmup_ratio=0.1", None),
        ("model.load_in_4bit=true", r"model: model\.load_in_4bit \(QLoRA\) trains adapters only"),
        ("data.eval=x.jsonl", r"set data\.eval or data\.eval_fraction, not both"),
        ("modle.dtype=float32", r"modle: unknown key \(did you mean 'model'\?\)"),
        ("model.dtype=float8", r"model\.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    ],
)
def test_errors_name_the_key_and_give_a_hint(tmp_path, override, expected):
    path = _write(tmp_path, ISSUE_YAML)
    if expected is None:
        load_config(path, [override])  # valid on its own
        with pytest.raises(ConfigError, match=r"warmup_steps or train\.warmup_ratio, not both"):
            load_config(path, [override, "train.warmup_steps=3"])
        return
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path, [override])
    assert str(path) in str(info.value) and "docs/configuration.md" in str(info.value)


def test_eval_every_without_eval_data_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="train.eval_every needs eval data"):
        load_config(_write(tmp_path, ISSUE_YAML), ["data.eval_fraction=0"])


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        load_config(_write(tmp_path, ISSUE_YAML), ["train.max_steps"])


def test_every_field_has_a_description():
    from pydantic import BaseModel

    def walk(cls: type[BaseModel]):
        for name, f in cls.model_fields.items():
            yield cls.__name__, name, f
            ann = f.annotation
            for a in getattr(ann, "__args__", (ann,)):
                if isinstance(a, type) and issubclass(a, BaseModel):
                    yield from walk(a)

    missing = [f"{c}.{n}" for c, n, f in walk(Config) if not f.description and c != "Config"]
    assert not missing, missing


def test_configuration_doc_is_in_sync():
    """docs/configuration.md is generated: `make docs` rewrites it from config.py."""
    assert (REPO / "docs" / "configuration.md").read_text().strip() == config_doc().strip()
