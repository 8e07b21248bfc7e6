"""Shared fixtures. Tests never touch the network; assets come from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ORPO_SHARED", REPO.parent / "shared"))


def _need(path: Path) -> Path:
    if not path.exists():
        msg = f"needs {path} (the shared assets folder; set ORPO_SHARED to point elsewhere)"
        if os.environ.get("ORPO_REQUIRE_SHARED") == "1":
            pytest.fail(msg + " and ORPO_REQUIRE_SHARED=1 forbids skipping", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def stories_dir(shared_dir: Path) -> Path:
    """The real tiny pretrained Llama (vocab 512, no pad token, no chat template)."""
    return _need(shared_dir / "assets" / "stories260K" / "hf")


@pytest.fixture(scope="session")
def hh_path(shared_dir: Path) -> Path:
    """1,800 Anthropic HH harmless pairs, implicit-prompt format."""
    return _need(shared_dir / "data" / "hh-rlhf" / "harmless-dev.jsonl.gz")


@pytest.fixture(scope="session")
def preference_dir(shared_dir: Path) -> Path:
    """ShareGPT (LLaMA-Factory), Orca message lists, StackExchange question/response_j/response_k."""
    return _need(shared_dir / "assets" / "preference")


@pytest.fixture(scope="session")
def stories_tokenizer(stories_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(stories_dir))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: two threads spend more time synchronizing than computing (15 ms per small
    matmul instead of 0.02 ms on a busy 2-core machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own tokenization cache, never the user's ~/.cache/orpo."""
    monkeypatch.setenv("ORPO_CACHE", str(tmp_path_factory.getbasetemp() / "orpo-cache"))


@pytest.fixture(scope="session")
def verdict_judges(stories_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """stories260K trained to answer every judge prompt "[[A]]" (``judge_model.py``), saved twice:
    ``chat`` with a chat template (a served judge is asked by chat), ``plain`` without one (asked by
    ``/completions``, the fallback), the same weights."""
    from judge_model import verdict_judge
    from transformers import AutoTokenizer

    chat = verdict_judge(stories_dir, tmp_path_factory.mktemp("judge-chat"), "[[A]]", chat=True)
    plain = tmp_path_factory.mktemp("judge-plain")
    for f in chat.iterdir():
        if f.name not in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja"):
            (plain / f.name).write_bytes(f.read_bytes())
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(plain)
    return {"chat": chat, "plain": plain}


@pytest.fixture(scope="session")
def model_server(tmp_path_factory):
    """One real ``transformers serve`` for the session, serving any local folder a request names
    (its access log, ``server.log``, lists every request)."""
    from served import served

    with served(log_dir=tmp_path_factory.mktemp("serve"), extra_args=("--log-level", "info")) as s:
        yield s
