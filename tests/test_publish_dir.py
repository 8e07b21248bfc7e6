"""``checkpoint.publish_dir``: a replaced folder is never missing where the OS can swap atomically."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from orpo import disk as checkpoint
from orpo.disk import atomic_dir, publish_dir


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights").write_text(text)
    return path


def _watch(monkeypatch, final: Path) -> list[str]:
    """Record, at every rename and delete publish_dir makes, what a reader of ``final`` would find."""
    seen: list[str] = []

    def look() -> None:
        seen.append((final / "weights").read_text() if final.exists() else "missing")

    real_rename, real_rmtree = os.rename, checkpoint.shutil.rmtree

    def rename(a, b):
        real_rename(a, b)
        look()

    def rmtree(p, *args, **kwargs):
        look()
        real_rmtree(p, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    return seen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_replacing_a_folder_never_leaves_its_name_empty(tmp_path, monkeypatch):
    final = _folder(tmp_path / "final", "old")
    if not checkpoint._exchange(_folder(tmp_path / "probe", "x"), final):
        pytest.skip(f"the filesystem of {tmp_path} cannot exchange names (RENAME_EXCHANGE)")
    checkpoint._exchange(tmp_path / "probe", final)  # swap back
    seen = _watch(monkeypatch, final)
    publish_dir(_folder(tmp_path / ".final.tmp", "new"), final)
    assert "missing" not in seen and seen[-1] == "new"
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "probe"]


def test_without_exchange_the_old_folder_waits_aside(tmp_path, monkeypatch):
    """The fallback (no renameat2): the documented moment without ``final``, the old copy under .final.old."""
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    final = _folder(tmp_path / "final", "old")
    seen = _watch(monkeypatch, final)
    publish_dir(_folder(tmp_path / ".final.tmp", "new"), final)
    assert seen == ["missing", "new", "new"]
    assert (final / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_atomic_dir_publishes_a_new_folder_and_leaves_final_alone_on_failure(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError
    assert (final / "weights").read_text() == "first"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("second")
    assert (final / "weights").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
