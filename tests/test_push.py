"""`orpo push` and train.push_to_hub against a local server that speaks the part of the Hub API
huggingface_hub uses to create a repo, a branch and a commit (HF_ENDPOINT points at it): what
arrives is read back from the server and compared with the folder byte for byte."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from tiny import write_short_pairs

from orpo import disk
from orpo.hub import HubError, check_model_folder, files_to_push
from orpo.train.card import front_matter

TOKEN = "hf_test_token"
# Importing peft imports bitsandbytes, whose kernels package asks the hub about these at import
# time, before any orpo code runs: the library's calls, not orpo's, left out of FakeHub.ours().
IMPORT_TIME_CALLS = ("GET /api/agent-harnesses", "GET /api/organizations/kernels-community/")
REPO = Path(__file__).resolve().parents[1]


class FakeHub:
    """Repos, branches and commits as the Hub would keep them; ``fail_commit``: answer 500 on commit."""

    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files"}
        self.calls: list[str] = []  # "METHOD path" of every request
        self.validated: list[str] = []  # model cards huggingface_hub sent to /api/validate-yaml
        self.fail_commit = False
        self.fail_summaries: set[str] = set()  # answer 500 to the commits with these messages
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet test output
                pass

            def do_GET(self):
                hub.calls.append(f"GET {self.path}")
                if self.path.startswith("/api/whoami-v2") and self._authorized():
                    return self._reply(200, {"name": "tester", "type": "user", "orgs": []})
                self._reply(404, {"error": "not found"})

            def do_POST(self):
                hub.calls.append(f"POST {self.path}")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self._authorized():
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                parts = [unquote(p) for p in urlsplit(self.path).path.split("/")]
                if parts[1:3] == ["api", "validate-yaml"]:
                    hub.validated.append(json.loads(body)["content"])
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[1:4] == ["api", "repos", "create"]:
                    return hub._create(self, json.loads(body))
                if len(parts) == 7 and parts[1:3] == ["api", "models"]:
                    repo, action, rev = f"{parts[3]}/{parts[4]}", parts[5], parts[6]
                    if repo not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                            "shouldIgnore": False} for f in files]})
                    if action == "branch":
                        branches = hub.repos[repo]["branches"]
                        if rev in branches:
                            return self._reply(409, {"error": "Reference already exists"})
                        branches[rev] = dict(branches["main"])
                        return self._reply(200, {})
                    if action == "commit":
                        return hub._commit(self, repo, rev, body)
                self._reply(404, {"error": f"not in this fake: {self.path}"})

            def _authorized(self) -> bool:
                return self.headers.get("Authorization") == f"Bearer {TOKEN}"

            def _reply(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def ours(self) -> list[str]:
        return [c for c in self.calls if not c.startswith(IMPORT_TIME_CALLS)]

    def _create(self, handler, payload: dict):
        repo = f"{payload['organization']}/{payload['name']}"
        if repo in self.repos:
            return handler._reply(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"})
        self.repos[repo] = {"private": payload.get("visibility") == "private" or payload.get("private") is True,
                            "branches": {"main": {}}}
        handler._reply(200, {"url": f"{self.url}/{repo}", "name": repo})

    def _commit(self, handler, repo: str, rev: str, body: bytes):
        summary = next(json.loads(line)["value"]["summary"] for line in body.splitlines() if b'"header"' in line)
        if self.fail_commit or summary in self.fail_summaries:
            return handler._reply(500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"})
        branches = self.repos[repo]["branches"]
        if rev not in branches:
            return handler._reply(404, {"error": f"Invalid rev id: {rev}"})
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {}
        for line in lines:
            if line["key"] == "file":
                assert line["value"]["encoding"] == "base64"
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] != "header":
                return handler._reply(400, {"error": f"this fake takes regular files only, not {line['key']}"})
        branches[rev].update(files)
        self.commits.append({"repo": repo, "revision": rev, "summary": header["summary"], "files": files})
        oid = f"{len(self.commits):040x}"
        handler._reply(200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid})


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    hub.thread.start()
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


def _env(tmp_path: Path, hub: FakeHub | None, token: str | None = TOKEN) -> dict[str, str]:
    """The environment of an `orpo` process: the fake hub, its own HF_HOME (no stored token), online."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update({"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "PYTHONPATH": str(REPO / "src")})
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    if token:
        env["HF_TOKEN"] = token
    return env


def _orpo(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orpo.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _config(tmp_path: Path, stories_dir: Path, **train) -> Path:
    data = write_short_pairs(tmp_path / "pairs.jsonl", 24)
    cfg = {"model": {"name_or_path": str(stories_dir), "chat_template": "none"},
           "data": {"train": str(data), "max_length": 48},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 4,
                     "learning_rate": 1e-3, "save_every": 2, **train}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, stories_dir) -> Path:
    """A finished tiny run (stories260K, 4 steps): its final/ is what `orpo push` sends."""
    from orpo.config import load_config
    from orpo.train import train

    tmp = tmp_path_factory.mktemp("pushrun")
    train(load_config(str(_config(tmp, stories_dir))))
    return tmp / "run"


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    """orpo's own lines on stderr (a library may print its import-time notes there too)."""
    return [line for line in proc.stderr.splitlines() if line.startswith("orpo ")]


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {rel: (folder / rel).read_bytes() for rel in files_to_push(folder)}


def test_push_sends_the_folder_byte_for_byte_with_its_card(finished_run, fake_hub, tmp_path):
    final = finished_run / "final"
    before = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    proc = _orpo(["push", str(final), "--repo", "me/tiny-orpo"], _env(tmp_path, fake_hub))
    assert proc.returncode == 0, proc.stderr
    assert "pushed" in proc.stdout and "me/tiny-orpo" in proc.stdout

    repo = fake_hub.repos["me/tiny-orpo"]
    assert repo["private"] is False
    received = repo["branches"]["main"]
    assert len(fake_hub.commits) == 1
    # every model file, byte for byte, and nothing of orpo's own bookkeeping
    assert received == _folder_files(final)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer_config.json"} <= set(received)
    assert not [name for name in received if name.startswith(".") or name.endswith((".pt", ".lock"))]
    meta = front_matter(received["README.md"].decode())
    assert "orpo" in meta["tags"] and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    # nothing travelled by LFS or Xet: only these endpoints were called
    assert fake_hub.ours() == ["POST /api/repos/create", "POST /api/validate-yaml",
                              "POST /api/models/me/tiny-orpo/preupload/main", "POST /api/models/me/tiny-orpo/commit/main"]
    assert fake_hub.validated == [received["README.md"].decode()]
    after = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert after == before  # the local folder is only read


def test_push_private_to_a_branch(finished_run, fake_hub, tmp_path):
    final = finished_run / "final"
    proc = _orpo(["push", str(final), "--repo", "org/secret", "--private", "--revision", "exp-1"],
                 _env(tmp_path, fake_hub))
    assert proc.returncode == 0, proc.stderr
    repo = fake_hub.repos["org/secret"]
    assert repo["private"] is True
    assert repo["branches"]["main"] == {}  # the commit went to the new branch only
    assert repo["branches"]["exp-1"] == _folder_files(final)
    assert fake_hub.commits[0]["revision"] == "exp-1"
    assert "POST /api/models/org/secret/branch/exp-1" in fake_hub.ours()


def test_push_without_a_token_is_one_line_and_sends_nothing(finished_run, fake_hub, tmp_path):
    proc = _orpo(["push", str(finished_run / "final"), "--repo", "me/x"], _env(tmp_path, fake_hub, token=None))
    assert proc.returncode == 2, proc.stderr
    lines = _errors(proc)
    assert len(lines) == 1 and "HF_TOKEN" in lines[0] and "hf auth login" in lines[0]
    assert fake_hub.ours() == []


def test_a_refused_token_is_exit_2(finished_run, fake_hub, tmp_path):
    proc = _orpo(["push", str(finished_run / "final"), "--repo", "me/x"], _env(tmp_path, fake_hub, token="hf_wrong"))
    assert proc.returncode == 2, proc.stderr
    assert "401" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert fake_hub.repos == {}


def test_a_server_error_on_commit_fails_clearly(finished_run, fake_hub, tmp_path):
    fake_hub.fail_commit = True
    final = finished_run / "final"
    marker = (finished_run / disk.MARKER).read_bytes()
    proc = _orpo(["push", str(final), "--repo", "me/broken"], _env(tmp_path, fake_hub))
    assert proc.returncode == 6, proc.stderr
    assert "500" in proc.stderr and "nothing was committed" in proc.stderr
    assert "Traceback" not in proc.stderr and "pushed" not in proc.stdout
    assert fake_hub.repos["me/broken"]["branches"]["main"] == {}
    assert (finished_run / disk.MARKER).read_bytes() == marker


@pytest.mark.parametrize("target, message", [
    ("", "is a run folder"),
    ("checkpoints", "a checkpoint holds training state"),
    ("checkpoints/step-2", "not a model folder orpo wrote"),
    ("missing", "does not exist"),
    ("metrics.jsonl", "not a folder"),
])
def test_push_refuses_what_is_not_a_finished_model_folder(finished_run, fake_hub, tmp_path, target, message):
    proc = _orpo(["push", str(finished_run / target), "--repo", "me/x"], _env(tmp_path, fake_hub))
    assert proc.returncode == 2
    assert len(_errors(proc)) == 1 and message in _errors(proc)[0]
    assert fake_hub.ours() == []


def test_check_model_folder_refuses_an_unfinished_run(finished_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(disk.LOCK))
    check_model_folder(run / "final")  # a finished copy is fine
    disk.set_marker(run, finished_step=None)
    with pytest.raises(HubError, match="has not finished"):
        check_model_folder(run / "final")
    stray = tmp_path / "stray"
    shutil.copytree(run / "final", stray)  # the same files, but not in a folder orpo wrote
    with pytest.raises(HubError, match="not a model folder orpo wrote"):
        check_model_folder(stray)


def test_the_allow_list(tmp_path):
    folder = tmp_path / "m"
    for rel in ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "README.md",
                "tokenizer.model", "chat_template.jinja", "merges.txt", "base/config.json", "base/model.safetensors",
                disk.MARKER, disk.LOCK, ".cache/huggingface/x.json", "optimizer.pt", "pytorch_model.bin",
                "trainer_state.json", "manifest.json", "state/__0_0.distcp", "notes.yaml", "run.py"]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("x")
    assert files_to_push(folder) == ["README.md", "base/config.json", "base/model.safetensors", "chat_template.jinja",
                                     "config.json", "merges.txt", "model-00001-of-00002.safetensors",
                                     "model.safetensors.index.json", "tokenizer.model"]
    (folder / "link.json").symlink_to(folder / "config.json")
    with pytest.raises(HubError, match="symlink"):
        files_to_push(folder)


def test_push_to_hub_at_the_end_of_training(fake_hub, tmp_path, stories_dir):
    cfg = _config(tmp_path, stories_dir, push_to_hub=True, hub_model_id="me/run-end", hub_private=True)
    proc = _orpo(["train", str(cfg)], _env(tmp_path, fake_hub))
    assert proc.returncode == 0, proc.stderr
    final = tmp_path / "run" / "final"
    assert [c["revision"] for c in fake_hub.commits] == ["main"]
    assert fake_hub.repos["me/run-end"]["private"] is True
    assert fake_hub.repos["me/run-end"]["branches"]["main"] == _folder_files(final)
    assert "step 4" in fake_hub.commits[0]["summary"]
    assert "hub            pushed" in proc.stderr  # the closing summary


def test_push_every_save_pushes_each_checkpoint_then_the_final_model(fake_hub, tmp_path, stories_dir):
    cfg = _config(tmp_path, stories_dir, push_to_hub=True, hub_model_id="me/run-saves", hub_strategy="every_save",
                  max_steps=5)
    proc = _orpo(["train", str(cfg)], _env(tmp_path, fake_hub))
    assert proc.returncode == 0, proc.stderr
    summaries = [c["summary"] for c in fake_hub.commits]
    assert summaries == ["orpo train: step 2", "orpo train: step 4", "orpo train: final model, step 5"]
    # each checkpoint's push is the model at that step, as final/ would hold it: its card says the step
    for commit, step in zip(fake_hub.commits[:2], (2, 4), strict=True):
        assert f"at step {step}" in commit["files"]["README.md"].decode()
        assert set(commit["files"]) == set(fake_hub.commits[2]["files"])
    assert fake_hub.repos["me/run-saves"]["branches"]["main"] == _folder_files(tmp_path / "run" / "final")
    # the scratch copies were outside the run folder, which holds only what a run without a push holds
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        [disk.MARKER, disk.LOCK, "checkpoints", "config.yaml", "data_summary.json", "final", "metrics.jsonl"])


def test_a_failed_checkpoint_push_is_a_warning_and_the_run_goes_on(fake_hub, tmp_path, stories_dir):
    fake_hub.fail_summaries = {"orpo train: step 2"}
    cfg = _config(tmp_path, stories_dir, push_to_hub=True, hub_model_id="me/flaky", hub_strategy="every_save")
    proc = _orpo(["train", str(cfg)], _env(tmp_path, fake_hub))
    assert proc.returncode == 0, proc.stderr
    assert [c["summary"] for c in fake_hub.commits] == ["orpo train: final model, step 4"]
    assert any("warning: pushing the model of step 2" in line and "500" in line for line in _errors(proc))
    assert "1 checkpoint pushes failed" in proc.stderr
    assert fake_hub.repos["me/flaky"]["branches"]["main"] == _folder_files(tmp_path / "run" / "final")


def test_push_to_hub_without_a_token_stops_before_the_run_folder(fake_hub, tmp_path, stories_dir):
    cfg = _config(tmp_path, stories_dir, push_to_hub=True, hub_model_id="me/x")
    proc = _orpo(["train", str(cfg)], _env(tmp_path, fake_hub, token=None))
    assert proc.returncode == 2
    assert "HF_TOKEN" in _errors(proc)[-1]
    assert not (tmp_path / "run").exists()
    assert fake_hub.ours() == []


def test_a_failed_final_push_exits_non_zero_with_the_run_saved(fake_hub, tmp_path, stories_dir):
    fake_hub.fail_commit = True
    cfg = _config(tmp_path, stories_dir, push_to_hub=True, hub_model_id="me/x")
    proc = _orpo(["train", str(cfg)], _env(tmp_path, fake_hub))
    assert proc.returncode == 6
    last = _errors(proc)[-1]
    assert "final" in last and "orpo push" in last and "500" in last
    assert disk.read_marker(tmp_path / "run")["finished_step"] == 4
    check_model_folder(tmp_path / "run" / "final")


@pytest.mark.parametrize("override, message", [
    ({"push_to_hub": True}, "needs train.hub_model_id"),
    ({"push_to_hub": True, "hub_model_id": "no-slash"}, "not a hub repo id"),
    ({"push_to_hub": True, "hub_model_id": "a/b", "save_final": False}, "save_final"),
    ({"hub_strategy": "sometimes"}, "hub_strategy"),
])
def test_hub_keys_are_checked(override, message):
    from orpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(raw={"train": override})
