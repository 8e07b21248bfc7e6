"""Publishing a model folder orpo wrote to the Hugging Face Hub (``orpo push``, ``train.push_to_hub``).

Everything that can be checked without the network is checked first: the folder is a finished orpo
model folder (a run's ``final/`` or ``best/``, or an ``orpo merge`` output), the repo id has the
form ``ORG/NAME`` and a token is there. Only then is the repo created (``create_repo``) and the files
sent in one commit (``create_commit``): the hub applies a commit whole or not at all, so a failed push
leaves no half-uploaded revision, and the local folder is only ever read. What is sent is an allow
list (``files_to_push``): weights, configs, tokenizer files and the model card; never orpo's
marker or lock, hidden files, checkpoint state (optimizer, RNG, manifest) or pickles.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

from orpo import disk
from orpo.config import ConfigError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a saved model folder holds that a hub model repo needs: weights, configs, tokenizer, the card.
ALLOWED = ("*.safetensors", "*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja", "README.md")
# Never sent even where ALLOWED matches: a training checkpoint's own files (a folder of one is refused anyway).
NEVER = ("trainer_state.json", "manifest.json", disk.MARKER, disk.LOCK)
TOKEN_HELP = "set HF_TOKEN or run `hf auth login` (a token with write access)"


class HubError(ConfigError):
    """Bad input for a push (not a model folder, a bad repo id, no token): exit 2, nothing sent."""


class PushFailed(RuntimeError):
    """The hub refused or failed the upload: nothing was committed, the local folder is unchanged."""


@dataclass
class Pushed:
    """What one push sent: the commit's URL, the files (relative paths) and their bytes."""

    url: str
    files: list[str]
    size: int

    def describe(self, repo: str, revision: str | None) -> str:
        at = f" (branch {revision})" if revision else ""
        return f"pushed {len(self.files)} files ({self.size / 2**20:,.1f} MiB) to {repo}{at}: {self.url}"


def check_repo_id(repo: str, what: str) -> str:
    if not REPO_ID.match(repo or "") or ".." in repo:
        raise HubError(f"{what}: '{repo}' is not a hub repo id: give ORG/NAME (letters, digits, '-', '_', '.')")
    return repo


def check_model_folder(folder: Path) -> None:
    """Refuse, before any network call, a folder that is not a finished model folder orpo wrote."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        raise HubError(f"{folder} does not exist")
    if folder.is_symlink() or not folder.is_dir():
        raise HubError(f"{folder} is not a folder (a symlink or a file); give a run's final/ folder")
    if (folder / disk.MARKER).is_file():
        own = disk.read_marker(folder) or {}
        if own.get("kind") == "run":
            hint = " (its model is in final/)" if (folder / "final").is_dir() else " with no final/ yet"
            raise HubError(f"{folder} is a run folder{hint}: push {folder / 'final'}")
        if own.get("kind") != "model":
            raise HubError(f"{folder} is an orpo {own.get('kind')} folder, not a model folder")
    else:
        parent = disk.read_marker(folder.parent)
        if parent is None or parent.get("kind") != "run" or folder.name not in parent["made"]:
            raise HubError(f"{folder} is not a model folder orpo wrote (a run's final/ or best/, "
                           "or an `orpo merge` output)")
        if folder.name == "final" and parent.get("finished_step") is None:
            raise HubError(f"{folder.parent} has not finished (no finished step in its "
                           f"{disk.MARKER}): let the run finish, or resume it with train.resume=auto")
        if folder.name not in ("final", "best"):
            raise HubError(f"{folder} is a run's {folder.name}/, not a model: push the run's final/ "
                           "(a checkpoint holds training state, not a model folder)")
    names = {p.name for p in folder.iterdir()}
    weights = any(n.endswith(".safetensors") for n in names)
    if not weights or not ({"config.json", "adapter_config.json"} & names) or "README.md" not in names:
        raise HubError(f"{folder} lacks a model's files (config.json or adapter_config.json, "
                       "*.safetensors weights and README.md)")


def files_to_push(folder: Path) -> list[str]:
    """The files sent, relative to ``folder`` (sorted): the allow list, no hidden path, no symlink."""
    folder = Path(folder)
    chosen = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_symlink():
            raise HubError(f"{path} is a symlink; orpo sends only the files it wrote: remove it")
        if not path.is_file() or any(part.startswith(".") for part in rel.parts) or rel.name in NEVER:
            continue
        if any(fnmatch.fnmatch(rel.name, pattern) for pattern in ALLOWED):
            chosen.append(rel.as_posix())
    return chosen


def hub_token() -> str:
    """The token huggingface_hub would use (HF_TOKEN, else the one `hf auth login` stored)."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HubError(f"no Hugging Face token: {TOKEN_HELP}")
    return token


def create_repo(repo: str, *, private: bool, token: str) -> str:
    """The repo (created if new; an existing one keeps its visibility); its URL."""
    from huggingface_hub import HfApi

    return str(_call(lambda: HfApi(token=token).create_repo(repo, private=private, exist_ok=True),
                     f"creating the hub repo {repo}"))


def push_folder(folder: Path, repo: str, *, private: bool = False, revision: str | None = None,
                message: str = "orpo push", token: str | None = None) -> Pushed:
    """Send ``files_to_push(folder)`` to ``repo`` (created if needed) in one commit, on ``revision``
    (a branch, created from main if new)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    files = files_to_push(folder)
    token = token or hub_token()
    api = HfApi(token=token)
    create_repo(repo, private=private, token=token)
    if revision and revision != "main":
        _call(lambda: api.create_branch(repo, branch=revision, exist_ok=True), f"creating branch {revision} of {repo}")
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in files]
    info = _call(lambda: api.create_commit(repo, operations, commit_message=message, revision=revision),
                 f"uploading {folder} to {repo}")
    return Pushed(url=str(info.commit_url), files=files, size=sum((folder / rel).stat().st_size for rel in files))


def _call(fn, doing: str):
    """One hub call; its failure as one line: a refused token is bad input (exit 2), anything else PushFailed."""
    from huggingface_hub import errors
    from huggingface_hub.errors import HfHubHTTPError

    # the HTTP client's own base error (a refused connection, a timeout), whichever client this
    # huggingface_hub version is built on (httpx, httpx2): errors.py imports it by that name
    transport_error = getattr(errors, "HTTPError", OSError)

    try:
        return fn()
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if status == 401:
            raise HubError(f"{doing}: the hub refused the token (401): {TOKEN_HELP}") from e
        raise PushFailed(f"{doing} failed ({first}); nothing was committed and the local folder is "
                         "unchanged: run it again") from e
    except ValueError as e:  # the hub's answer to the model card's metadata (validate-yaml) among them
        raise PushFailed(f"{doing}: the hub refused it ({str(e).strip().splitlines()[0]}); nothing was "
                         "committed and the local folder is unchanged") from e
    except (transport_error, OSError) as e:
        raise PushFailed(f"{doing} failed ({type(e).__name__}: {e}); nothing was committed and the local "
                         "folder is unchanged: run it again") from e
