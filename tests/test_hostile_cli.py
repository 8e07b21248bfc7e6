"""`orpo preprocess` on hostile data: exit 0 with the summary, or exit 2 with one line on stderr
naming the file, no traceback, nothing on stdout and nothing cached."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hostile import KINDS, MAX_LENGTH, ROWS, encode_file, examples, write
from hypothesis import given, settings
from hypothesis import strategies as st

from orpo.cli import EXIT_USAGE, main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"arch": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1}


def _config(folder: Path, data: Path, stories_dir: Path, **extra) -> Path:
    cfg = {"model": {"init": TINY, "tokenizer": str(stories_dir), "chat_template": "none"},
           "data": {"train": str(data), "max_length": MAX_LENGTH, "cache_dir": str(folder / "cache"), **extra},
           "train": {"output_dir": str(folder / "run")}}
    path = folder / f"{data.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _damage(raw: bytes, how: str, at: float) -> bytes:
    i = max(1, int(len(raw) * at))
    if how == "cut":
        return raw[:i]
    if how == "bom":
        return b"\xef\xbb\xbf" + raw
    if how == "overwrite":
        return raw[:i] + b"\x80\x00\xff{" + raw[i + 4 :]
    return raw


def test_preprocess_exits_0_or_2_with_one_line_and_no_traceback(tmp_path_factory, stories_dir):
    folder = tmp_path_factory.mktemp("hostile-cli")

    @settings(max_examples=examples(25))
    @given(fmt=st.sampled_from(sorted(ROWS)), kind=st.sampled_from(KINDS), data=st.data(),
           how=st.sampled_from(["none", "none", "cut", "bom", "overwrite"]), at=st.floats(0, 1), skip=st.booleans())
    def check(fmt, kind, data, how, at, skip):
        rows = data.draw(st.lists(ROWS[fmt](), min_size=1, max_size=4))
        path = write(folder, kind, _damage(encode_file(kind, rows), how, at))
        cfg = _config(folder, path, stories_dir, on_bad_row="skip" if skip else "error")
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["preprocess", str(cfg)])
        assert code in (0, EXIT_USAGE)
        assert "Traceback" not in err.getvalue()
        if code == 0:
            assert "Preference data" in out.getvalue()
            return
        lines = [line for line in err.getvalue().splitlines() if "error" in line]
        assert len(lines) == 1 and lines[0].startswith(f"orpo preprocess: error: {path}"), err.getvalue()
        assert err.getvalue().rstrip().endswith(lines[0])
        assert out.getvalue() == ""  # no summary that could pass for a result
        cache = folder / "cache"
        assert not cache.exists() or not any(p for p in cache.iterdir() if p.name.startswith(path.stem))

    check()


def test_preprocess_in_a_real_process(tmp_path, stories_dir):
    """The installed entry point, as a user runs it: exit status 2 and exactly one line on stderr."""
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"prompt": "Hi", "chosen": "a", "rejected": "b"}\n{"prompt": "x\\udc00", "chosen": "a", '
                     b'"rejected": "b"}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "orpo.cli", "preprocess", str(_config(tmp_path, data, stories_dir))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"orpo preprocess: error: {data} line 2: field 'prompt': not valid Unicode: lone surrogate '\\udc00' at "
        "character 1"
    ]
