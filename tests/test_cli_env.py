"""What the installed ``orpo`` command sets up before any work."""

from __future__ import annotations

import importlib.metadata
import os

from orpo.cli import main


def test_the_installed_command_is_main():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert scripts["orpo"].value == "orpo.cli:main"


def test_main_turns_tokenizer_parallelism_off_unless_the_user_chose(monkeypatch, capsys):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    assert main(["config-doc"]) == 0
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    assert main(["config-doc"]) == 0
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
