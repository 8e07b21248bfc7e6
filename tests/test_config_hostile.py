"""Hostile configurations: whatever the file or an override holds, ``load_config`` returns a Config or raises
one ConfigError that names the file (or the override), the key and what is allowed; never a traceback, a hang
or a huge allocation (binary files, ``[[[[...``, alias bombs, ``!!python`` tags, duplicate keys, huge numbers)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hostile import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from orpo.cli import EXIT_USAGE, main
from orpo.config import Config, ConfigError, load_config

BASE = """\
model:
  name_or_path: some/model
data:
  train: train.jsonl
train:
  max_steps: 3
"""


def _write(tmp_path: Path, text: str | bytes, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _error(path: Path | None, overrides: list[str] | None = None, **kw: Any) -> str:
    """The ConfigError's message, checked to have come fast."""
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, **kw)
    assert time.monotonic() - start < 10, "took too long to refuse"
    return str(info.value)


def test_binary_and_non_utf8_files_name_the_byte_and_line(tmp_path):
    path = _write(tmp_path, b"train:\n  max_steps: 3\n  output_dir: r\xe9sum\xe9\n")
    assert _error(path) == (f"{path}: not UTF-8 text: byte 0xe9 at offset 37 (line 3); a configuration is a UTF-8 "
                            "YAML file")
    path = _write(tmp_path, b"train:\n  max_steps: \x00\x01\x02\x7fELF\n")
    assert _error(path) == (f"{path}: invalid YAML: line 2: character '\\x00' is not allowed in YAML text "
                            "(a binary file?)")
    big = _write(tmp_path, b"#" * (2 << 20))
    assert "larger than 65536 bytes" in _error(big)


def test_deep_nesting_is_refused_fast_in_a_file_and_in_an_override(tmp_path):
    for closed in ("", "]" * 10_000):
        message = _error(_write(tmp_path, "train:\n  report_to: " + "[" * 50_000 + closed + "\n"))
        assert message == f"{tmp_path / 'cfg.yaml'}: invalid YAML: line 2, column 76: nested deeper than 64 levels"
    message = _error(_write(tmp_path, BASE), ["train.report_to=" + "[" * 50_000])
    assert message == "override train.report_to: invalid YAML: line 1, column 65: nested deeper than 64 levels"
    block = "".join("  " * i + f"k{i}:\n" for i in range(100)) + "  " * 100 + "x: 1\n"
    assert "nested deeper than 64 levels" in _error(_write(tmp_path, block))


def test_override_values_must_be_plain_yaml_and_tags_never_run(tmp_path):
    path = _write(tmp_path, BASE)
    assert _error(path, ["train.max_steps=["]) == (
        "override train.max_steps: invalid YAML: line 1, column 2: expected the node content, but found "
        "'<stream end>' (while parsing a flow node)")
    marker = tmp_path / "ran"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    message = _error(path, [f"train.max_steps={tag}"])
    assert message.startswith("override train.max_steps: invalid YAML: line 1, column 1: could not determine a "
                              "constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'")
    assert message.endswith("(only plain YAML is read: no !!python or other tags)")
    message = _error(_write(tmp_path, BASE + f"  seed: {tag}\n"))
    assert message.startswith(f"{path}: invalid YAML: line 7, column 9: could not determine a constructor")
    assert not marker.exists()
    assert "line 7, column 9: day is out of range for month" in _error(_write(tmp_path, BASE + "  seed: 2001-02-30\n"))


CPUS = os.cpu_count() or 1
NUMBERS = [
    ("train.epochs", ".inf", "train.epochs: Input should be a finite number"),
    ("train.epochs", "1e9", "train.epochs: Input should be less than or equal to 10000"),
    ("train.seed", "-1", "train.seed: Input should be greater than or equal to 0"),
    ("train.seed", str(2**64), "train.seed: Input should be less than 4294967296"),
    ("train.num_workers", str(CPUS + 1), f"train.num_workers: {CPUS + 1} DataLoader workers, but this machine has "
                                         f"{CPUS} CPUs: use at most {CPUS}"),
    ("model.lora.r", "1.0e+12", "model.lora.r: Input should be less than or equal to 65536"),
    ("model.lora.alpha", ".inf", "model.lora.alpha: Input should be a finite number"),
    ("model.init.hidden_size", "1e12", "model.init: hidden_size: a size must be an integer, got '1e12'"),
    ("model.init.hidden_size", "1.0e+12", "model.init: hidden_size: a size must be an integer, got '1000000000000.0'"),
    ("model.init.num_hidden_layers", str(10**12), "model.init: num_hidden_layers: 1000000000000 is outside "
                                                  "0..1048576 (2**20), the range of a size"),
    ("model.init.rope_theta", ".nan", "model.init: rope_theta: nan is not a finite number"),
    ("train.learning_rate", ".inf", "train.learning_rate: Input should be a finite number"),
    ("train.max_grad_norm", ".inf", "train.max_grad_norm: Input should be a finite number"),
    ("train.weight_decay", ".nan", "train.weight_decay: Input should be a finite number"),
    ("orpo.beta", ".inf", "orpo.beta: Input should be a finite number"),
    ("train.health.spike_factor", ".inf", "train.health.spike_factor: Input should be a finite number"),
]


@pytest.mark.parametrize(("key", "value", "expected"), NUMBERS, ids=[f"{k}={v}" for k, v, _ in NUMBERS])
def test_numbers_are_finite_and_bounded(tmp_path, key, value, expected):
    base = BASE.replace("name_or_path: some/model", "tokenizer: some/tok") if ".init." in key else BASE
    path = _write(tmp_path, base)
    assert _error(path, [f"{key}={value}"]) == f"{path}: {expected} (every key and its default: docs/configuration.md)"
    doc = yaml.safe_load(base)
    *sections, leaf = key.split(".")
    node = doc
    for name in sections:
        node = node.setdefault(name, {})
    node[leaf] = yaml.safe_load(value)
    in_file = _write(tmp_path, yaml.safe_dump(doc), name="in-file.yaml")
    assert _error(in_file) == f"{in_file}: {expected} (every key and its default: docs/configuration.md)"


def test_bounds_keep_every_sane_value(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_config(path, ["train.seed=0", "train.epochs=10000", f"train.num_workers={CPUS}", "model.lora.r=65536"])
    assert (cfg.train.seed, cfg.train.epochs, cfg.train.num_workers) == (0, 10000, CPUS)
    assert load_config(path, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
    init = load_config(_write(tmp_path, BASE.replace("name_or_path: some/model", "tokenizer: t")),
                       ["model.init={hidden_size: 1048576, tie_word_embeddings: true, vision_config: {num_heads: 2},"
                        " rope_scaling: {type: linear, factor: 2.0}}"]).model.init
    assert init is not None and init.model_dump()["vision_config"] == {"num_heads": 2}


def _bomb(levels: int, indent: str = "", leaf: str = "lol") -> str:
    lines = [f"{indent}l0: &l0 [{', '.join([leaf] * 9)}]"]
    lines += [f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_bombs_are_refused_before_they_expand(tmp_path):
    # 9**4 leaves of 10 characters: within the YAML bound, but 90 KiB as JSON: model.init's bound catches it
    init = "tokenizer: t\n  init:\n" + _bomb(4, "    ", "x" * 10)
    path = _write(tmp_path, BASE.replace("name_or_path: some/model", init))
    assert _error(path) == (f"{path}: model.init: larger than 65536 bytes as JSON: a model config is a few hundred "
                            "(every key and its default: docs/configuration.md)")
    # 9**9 leaves (gigabytes expanded) anywhere: refused while reading the YAML
    path = _write(tmp_path, _bomb(9) + BASE)
    assert _error(path) == (f"{path}: invalid YAML: line 5, column 5: aliases expand it past 131072 nodes and "
                            "characters (an alias bomb?)")
    assert "an alias refers to its own anchor (a cycle)" in _error(_write(tmp_path, "a: &a [*a]\n" + BASE))
    nested: list[Any] = ["lol"] * 9
    for _ in range(7):
        nested = [nested] * 9
    message = _error(None, raw={"model": {"tokenizer": "t", "init": {"x": nested}}})
    assert "model.init: x.0.0.0.0.0.0.0: nested deeper than 8 levels" in message
    message = _error(None, raw={"model": {"tokenizer": "t", "init": {"x": nested[0][0]}}})
    assert "model.init: larger than 65536 bytes as JSON" in message


def test_duplicate_keys_name_both_lines(tmp_path):
    path = _write(tmp_path, BASE + "train:\n  max_steps: 4\n")
    assert _error(path) == f"{path}: invalid YAML: line 7, column 1: duplicate key 'train' (lines 5 and 7)"
    path = _write(tmp_path, BASE + "  batch_size: 2\n  max_steps: 4\n")
    assert _error(path) == f"{path}: invalid YAML: line 8, column 3: duplicate key 'max_steps' (lines 6 and 8)"
    assert "duplicate key 'seed' (lines 1 and 1)" in _error(_write(tmp_path, BASE), ["train={seed: 1, seed: 2}"])
    merged = _write(tmp_path, "defaults: &d {max_steps: 1, batch_size: 2}\n" + BASE.replace(
        "train:\n  max_steps: 3\n", "train:\n  <<: *d\n  max_steps: 3\n"))
    with pytest.raises(ConfigError, match="defaults: unknown key"):  # a merge key's override is no duplicate
        load_config(merged)


def test_a_long_list_of_wrong_items_is_one_short_message(tmp_path):
    """15,000 wrong items: listed 20 at most, and found without comparing every error with every other."""
    path = _write(tmp_path, "model:\n  lora:\n    modules_to_save: [" + "1," * 15_000 + "]\n")
    lines = _error(path).splitlines()
    assert lines[1] == "  model.lora.modules_to_save.0: Input should be a valid string"
    assert lines[-2:] == ["  ... and 14980 more", "  see docs/configuration.md for every key and its default"]
    assert len(lines) == 23


@pytest.mark.parametrize("content", [
    b"\x7fELF\x02\x01\x01\x00\x00\x00\xff\xfe",
    b"train: " + b"[" * 50_000,
    b"train:\n  seed: !!python/object/new:os.system [echo]\n",
    b"train:\n  seed: 1\n  seed: 2\n",
    _bomb(9).encode(),
], ids=["binary", "deep", "python-tag", "duplicate", "alias-bomb"])
def test_cli_says_one_line_and_exits_2(tmp_path, capsys, content):
    path = _write(tmp_path, content)
    rc = main(["train", str(path)])
    out, err = capsys.readouterr()
    assert rc == EXIT_USAGE and out == ""
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"orpo train: error: {path}: ")


# ---------------------------------------------------------------------------------------------
# Random documents and overrides


def _keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the configuration, sections included."""
    out = []
    for name, field in cls.model_fields.items():
        out.append(prefix + name)
        for arg in getattr(field.annotation, "__args__", (field.annotation,)):
            inner = getattr(arg, "__args__", (arg,))[0] if getattr(arg, "__origin__", None) is list else arg
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                out += _keys(inner, f"{prefix}{name}.")
    return out


KEYS = sorted(set(_keys(Config))) + ["model.init.hidden_size", "model.init.vision_config.num_hidden_layers"]
TRAPS = ["[", "]", "{", "}", "[[[[[[[[", "&a", "*a", "!!python/object:os.system", "!!binary x", "!!int x",
         "2001-02-30", ".inf", "-.inf", ".nan", "1e9", "1.0e+12", str(2**64), "-1", "~", "<<: *a", "? [a]", "---",
         "\x00", "\ufeff", "\t", ":", "- ", "|", ">", "%YAML 1.1", "'", '"', "#", "@", "`", "\u2028", "0x1F", "1:2:3"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70), st.floats(),
                    st.text(st.characters(exclude_categories=["Cs"]), max_size=12), st.sampled_from(TRAPS))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from([k.split(".")[-1] for k in KEYS]), inner,
                                                 max_size=4)), max_leaves=10)
TEXT = st.lists(st.one_of(st.sampled_from(TRAPS), st.text(max_size=8), st.sampled_from(KEYS)), max_size=12).map(
    "".join)


def _nest(items: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in items:
        node = doc
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[leaf] = value
    return doc


@st.composite
def documents(draw) -> bytes:
    kind = draw(st.sampled_from(["yaml", "yaml", "yaml+text", "text", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "text":
        return draw(TEXT).encode("utf-8", "surrogatepass")
    doc = yaml.safe_dump(_nest(draw(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=8))),
                         allow_unicode=draw(st.booleans()), default_flow_style=draw(st.sampled_from([None, True])))
    if kind == "yaml+text":
        at = draw(st.integers(0, len(doc)))
        doc = doc[:at] + draw(TEXT) + doc[at:]
    return doc.encode("utf-8", "surrogatepass")


OVERRIDES = st.lists(st.one_of(
    st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={yaml.safe_dump(kv[1]).strip()}"),
    st.tuples(st.sampled_from(KEYS), TEXT).map("=".join),
    TEXT), max_size=4)


def test_random_documents_and_overrides_give_a_config_or_a_config_error(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile-config")

    @settings(max_examples=examples(100))
    @given(doc=documents(), overrides=OVERRIDES)
    def check(doc, overrides):
        path = folder / "cfg.yaml"
        path.write_bytes(doc)
        start = time.monotonic()
        try:
            assert isinstance(load_config(path, overrides), Config)
        except ConfigError as e:
            assert str(e).strip()
        assert time.monotonic() - start < 5

    check()


def test_a_key_with_a_bracket_is_named_not_taken_for_a_union_tag(tmp_path):
    """Found by the fuzz test above: `d[ata: []` crashed the error formatter (the key was dropped as
    if it were pydantic's `list[...]` branch tag, leaving an empty location)."""
    from orpo.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    for text, words in (("d[ata: []\n", "d[ata: unknown key (did you mean 'data'?)"),
                        ("data:\n  max_len[gth]: 3\n", "data.max_len[gth]: unknown key")):
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert words in str(err.value) and "\n" not in str(err.value)
