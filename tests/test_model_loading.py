"""Every way loading a model or tokenizer fails is one line on stderr, exit 2, naming the key or flag
and what to do (issue 21). Through the real CLI, offline: local folders built here, and for the
hub's answers (404, 401, 403, a missing revision) a local HTTP server that answers as the hub does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import transformers

from orpo.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_TOKENIZER = REPO / "examples" / "quickstart" / "tokenizer"
PAIRS = REPO / "examples" / "quickstart" / "train.jsonl"
TINY_LLAMA = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=512)


def one_line_error(capsys, rc: int, *needles: str, after_progress: bool = False) -> str:
    """The command failed with exit 2 and said so in exactly one line naming each needle (the last
    line, after what ``orpo train`` prints while it sets up, with ``after_progress``)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and (errors == lines or after_progress and errors == lines[-1:]), err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def save_tiny_llama(folder: Path) -> Path:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    model.save_pretrained(folder)
    shutil.copytree(QUICKSTART_TOKENIZER, folder, dirs_exist_ok=True)
    return folder


@pytest.fixture
def tokenizer_only(tmp_path: Path) -> Path:
    return Path(shutil.copytree(QUICKSTART_TOKENIZER, tmp_path / "tokenizer"))


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    base = save_tiny_llama(tmp_path / "base")
    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    shutil.copytree(QUICKSTART_TOKENIZER, tmp_path / "adapter", dirs_exist_ok=True)
    return tmp_path / "adapter"


def train_config(tmp_path: Path, **model) -> str:
    """A config (a new file each call) whose model section is ``model``; the data is the quickstart's."""
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*.yaml')))}.yaml"
    path.write_text(json.dumps({"model": model, "data": {"train": str(PAIRS)},
                                "train": {"output_dir": str(tmp_path / "run")}}))
    return str(path)


# ---------------------------------------------------------------------------------------------
# local folders


def test_a_path_that_does_not_exist_is_no_such_folder_never_a_hub_lookup(tmp_path, capsys):
    rc = main(["preprocess", train_config(tmp_path, name_or_path="./no/such/model")])
    line = one_line_error(capsys, rc, "model.name_or_path=./no/such/model", "no such folder")
    assert "Repo id" not in line
    rc = main(["eval", "--model", str(tmp_path / "missing"), "--data", str(PAIRS)])
    one_line_error(capsys, rc, "--model", "no such folder")


def test_a_file_is_not_a_model_folder(tmp_path, capsys):
    rc = main(["generate", "--model", str(PAIRS), "--prompt", "hi"])
    one_line_error(capsys, rc, "--model", "is a file")


def test_an_empty_folder_says_it_is_empty(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["eval", "--model", str(tmp_path / "empty"), "--data", str(PAIRS)])
    line = one_line_error(capsys, rc, "--model", "empty")
    assert "Unrecognized model" not in line
    rc = main(["preprocess", train_config(tmp_path, name_or_path=str(tmp_path / "empty"))])
    one_line_error(capsys, rc, "model.name_or_path", "empty")


def test_a_tokenizer_only_folder_is_named_a_tokenizer_for_model_tokenizer(tmp_path, tokenizer_only, capsys):
    rc = main(["preprocess", train_config(tmp_path, name_or_path=str(tokenizer_only))])
    one_line_error(capsys, rc, "model.name_or_path", "tokenizer only", "model.tokenizer")
    rc = main(["eval", "--model", str(tokenizer_only), "--data", str(PAIRS)])
    one_line_error(capsys, rc, "--model", "tokenizer only")


def test_a_model_tokenizer_folder_without_a_tokenizer_is_named(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("hi")
    rc = main(["preprocess", train_config(tmp_path, init={"arch": "llama", "hidden_size": 16},
                                          tokenizer=str(tmp_path / "nothing"))])
    one_line_error(capsys, rc, "model.tokenizer", "no tokenizer")


def test_an_adapter_where_a_full_model_is_expected_names_the_commands_that_take_it(tmp_path, adapter, capsys):
    rc = main(["preprocess", train_config(tmp_path, name_or_path=str(adapter))])
    one_line_error(capsys, rc, "model.name_or_path", "LoRA adapter", "orpo merge", "orpo eval")


def test_a_full_model_given_to_merge_is_not_an_adapter(tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "full")
    rc = main(["merge", str(model), str(tmp_path / "merged")])
    one_line_error(capsys, rc, "ADAPTER", "not an adapter; it is already a full model")
    assert not (tmp_path / "merged").exists()


def test_an_adapter_whose_base_is_gone_names_the_base(tmp_path, adapter, capsys):
    shutil.rmtree(tmp_path / "base")
    rc = main(["eval", "--model", str(adapter), "--data", str(PAIRS)])
    one_line_error(capsys, rc, "base model of --model", "no such folder")


def test_an_encoder_is_not_a_causal_lm(tmp_path, capsys):
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32, vocab_size=512)).save_pretrained(bert)
    shutil.copytree(QUICKSTART_TOKENIZER, bert, dirs_exist_ok=True)
    rc = main(["preprocess", train_config(tmp_path, name_or_path=str(bert))])
    one_line_error(capsys, rc, "model.name_or_path", "bert", "not a causal language model")
    rc = main(["generate", "--model", str(bert), "--prompt", "hi"])
    one_line_error(capsys, rc, "--model", "not a causal language model")


def test_remote_code_is_never_turned_on_silently(tmp_path, capsys):
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({
        "model_type": "my_custom", "architectures": ["MyCustomForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyCustomForCausalLM"},
    }))
    shutil.copytree(QUICKSTART_TOKENIZER, custom, dirs_exist_ok=True)
    rc = main(["preprocess", train_config(tmp_path, name_or_path=str(custom))])
    one_line_error(capsys, rc, "model.name_or_path", "model.trust_remote_code")
    rc = main(["eval", "--model", str(custom), "--data", str(PAIRS)])
    one_line_error(capsys, rc, "--model", "trust_remote_code")


def test_out_of_memory_while_loading_gives_the_size_the_free_memory_and_the_keys(tmp_path, monkeypatch, capsys):
    model = save_tiny_llama(tmp_path / "model")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", out_of_memory)
    monkeypatch.setattr("orpo.loading.free_memory", lambda on_gpu: 3 * 2**30)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    monkeypatch.setenv("ORPO_CACHE", str(tmp_path / "cache"))
    rc = main(["train", train_config(tmp_path, name_or_path=str(model))])
    line = one_line_error(capsys, rc, "model.name_or_path", "out of GPU memory", f"{size / 2**20:.1f} MiB",
                          "3.0 GiB", "model.dtype", "model.load_in_4bit", "train.distributed=fsdp2",
                          after_progress=True)
    assert "Tried to allocate" not in line


def test_verbose_prints_the_traceback_behind_the_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["--verbose", "eval", "--model", str(tmp_path / "empty"), "--data", str(PAIRS)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and "the folder is empty" in err.splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# the hub: offline, and a local server answering as the hub does


class FakeHub(BaseHTTPRequestHandler):
    """Answers as huggingface.co does: ``X-Error-Code`` and the status say which error it is
    (huggingface_hub's ``hf_raise_for_status`` turns them into its error classes)."""

    ANSWERS = {"org/missing": (404, "RepoNotFound"), "org/private": (401, "RepoNotFound"),
               "org/gated": (403, "GatedRepo"), "org/model": (404, "RevisionNotFound")}

    def answer(self) -> None:
        path = self.path.split("?")[0].removeprefix("/api/models/").lstrip("/")
        status, code = next((v for k, v in self.ANSWERS.items() if path.startswith(k + "/")), (404, "RepoNotFound"))
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = answer

    def log_message(self, *args) -> None:
        pass


DRIVER = """
import json, sys
from orpo.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    rc = main(argv)
    results.append(rc)
print("RESULTS " + json.dumps(results))
"""


def run_cli(tmp_path: Path, runs: list[list[str]], **env: str) -> tuple[list[int], list[str]]:
    """Several ``orpo`` commands in one process: huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and
    HF_HOME when it is imported. Returns the exit statuses and the error lines on stderr (``orpo train``
    says which engine it set up first)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HOME": str(tmp_path / "hf"),
                "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    full_env.pop("HF_TOKEN", None)
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], env=full_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    statuses = json.loads(done.stdout.split("RESULTS ")[-1])
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("engine:")]
    assert "Traceback" not in done.stderr and all("error:" in line for line in lines), done.stderr
    return statuses, lines


def test_a_hub_name_offline_and_not_cached_says_how_to_download_it_first(tmp_path):
    statuses, lines = run_cli(tmp_path, [["train", str(REPO / "examples" / "smollm2-135m.yaml")],
                                         ["eval", "--model", "meta-llama/Meta-Llama-3-8B", "--data", str(PAIRS)]],
                              HF_HUB_OFFLINE="1")
    assert statuses == [2, 2] and len(lines) == 2, lines
    train, evaluate = lines
    for needle in ("orpo train: error:", "model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct", "HF_HUB_OFFLINE",
                   "hf download HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert needle in train, train
    assert "--model meta-llama/Meta-Llama-3-8B" in evaluate and "hf download" in evaluate, evaluate


def test_hub_answers_404_401_403_and_a_missing_revision_are_one_line_each(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        statuses, lines = run_cli(tmp_path, [
            ["eval", "--model", "org/missing", "--data", str(PAIRS)],
            ["generate", "--model", "org/private", "--prompt", "hi"],
            ["preprocess", train_config(tmp_path, name_or_path="org/gated")],
            ["preprocess", train_config(tmp_path, name_or_path="org/model", revision="no-such-branch")],
        ], HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HUB_OFFLINE="0")
    finally:
        server.shutdown()
    assert statuses == [2, 2, 2, 2] and len(lines) == 4, lines
    missing, private, gated, revision = lines
    assert "--model org/missing" in missing and "no such model on the hub" in missing, missing
    assert "--model org/private" in private and "HF_TOKEN" in private and "hf auth login" in private, private
    assert "model.name_or_path=org/gated" in gated and "license" in gated and "HF_TOKEN" in gated, gated
    assert "model.name_or_path=org/model" in revision and "model.revision" in revision, revision
    assert "no-such-branch" in revision, revision


def test_a_model_init_too_large_for_memory_is_one_line_before_any_allocation(tmp_path, capsys):
    """Each size within its bound, the product is not: counted on the meta device, said in one line
    (was an allocator traceback, or minutes of building a million layers)."""
    qs = REPO / "examples" / "quickstart"
    cfg = tmp_path / "huge.yaml"
    cfg.write_text(f"model:\n  tokenizer: {qs / 'tokenizer'}\n  init: {{arch: llama, hidden_size: 65536, "
                   "intermediate_size: 262144, num_hidden_layers: 1048576, num_attention_heads: 512, "
                   f"num_key_value_heads: 512}}\ndata:\n  train: {qs / 'train.jsonl'}\n  max_samples: 8\n"
                   f"train:\n  output_dir: {tmp_path / 'run'}\n  max_steps: 1\n")
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    h, i, layers, vocab = 65536, 262144, 1048576, 512
    # per layer attention, MLP and norms; the embeddings, the head and the final norm
    params = layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * vocab * h + h
    assert f"model.init: {params:,} parameters" in errors[0] and "GiB of float32 weights alone" in errors[0], errors[0]
    assert not (tmp_path / "run").exists()
