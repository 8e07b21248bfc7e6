"""A real OpenAI-compatible server for tests: ``transformers serve`` on a free localhost port.

Tests that talk to an endpoint (``orpo compare``'s judge, ``orpo pairs``) run against the real
thing, not a fake. Use one server per test module, it takes seconds to start::

    @pytest.fixture(scope="module")
    def server(stories_dir):
        with served(stories_dir) as s:
            yield s

``served(model)`` pins the server to that model folder (``/v1/models`` lists it, a request naming
another model is refused); ``served()`` serves any local folder a request names, loading it on
first use (``/v1/models`` lists the loaded ones only). Offline (HF_HUB_OFFLINE=1), on the CPU,
one torch thread (tiny models are faster so, and the machine is shared). The fixture skips when the
serving extra (fastapi, uvicorn) is not installed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Server:
    """A started server: ``url`` is the API root (``http://127.0.0.1:PORT/v1``)."""

    port: int
    model: str | None
    process: subprocess.Popen
    log: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.root + "/v1"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port() -> int:
    """A port nothing listens on now (the OS picks it); the server binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(model: str | Path | None = None, *, log_dir: Path | None = None, timeout: float = START_TIMEOUT_S,
           extra_args: tuple[str, ...] = ()) -> Iterator[Server]:
    """Start ``transformers serve`` (pinned to ``model`` if given), wait for ``/health``, stop it after."""
    pytest.importorskip("fastapi", reason="transformers serve needs the serving extra (pip install orpo[serve])")
    pytest.importorskip("uvicorn", reason="transformers serve needs the serving extra (pip install orpo[serve])")
    port = free_port()
    log_dir = Path(log_dir) if log_dir is not None else Path(os.environ.get("TMPDIR", "/tmp"))
    log = log_dir / f"transformers-serve-{port}.log"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
               "serve", *([str(model)] if model is not None else []), "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--log-level", "warning", *extra_args]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(port=port, model=str(model) if model is not None else None, process=process, log=log)
    try:
        _wait_healthy(server, timeout)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"transformers serve exited with status {server.process.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            if httpx.get(server.root + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"transformers serve on port {server.port} not healthy after {timeout:.0f} s:\n"
                       f"{server.log_tail()}")
