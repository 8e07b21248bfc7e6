"""A chat template a person did not write: one that reaches past the Jinja sandbox, fails while
rendering, or is not UTF-8 is one ChatTemplateError naming the template (exit 2), never a traceback."""

from __future__ import annotations

import pytest
from tiny import write_short_pairs

from orpo.cli import main
from orpo.config import ConfigError
from orpo.data.formats import Pair
from orpo.data.templates import ChatTemplateError, render_pair, resolve_chat_template

LOOP = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
GEN = "{% if add_generation_prompt %}<assistant>{% endif %}"
ESCAPES = [
    ("{{ ''.__class__.__mro__ }}", "line 1 reads '__class__', '__mro__', which the Jinja sandbox refuses"),
    ("{{ cycler.__init__.__globals__ }}", "line 1 reads '__init__', '__globals__'"),
    ("\n\n{{ ''.__class__.__mro__[1].__subclasses__() }}", "line 3 reads '__class__', '__mro__', '__subclasses__'"),
    ("{{ ''['__class__'] }}", "line 1 reads '__class__'"),
    ("{{ ''|attr('__class__') }}", "line 1 reads '__class__'"),
    ("{{ messages.append(messages[0]) }}", "refused by the Jinja sandbox: access to attribute 'append'"),
    ("{% set x = messages.pop() %}", "refused by the Jinja sandbox: access to attribute 'pop'"),
]


@pytest.mark.parametrize(("extra", "message"), ESCAPES, ids=[m for _, m in ESCAPES])
def test_a_template_that_trips_the_sandbox_is_exit_2_in_one_line(tmp_path, capsys, extra, message):
    data = write_short_pairs(tmp_path / "d.jsonl", 4)
    template = tmp_path / "evil.jinja"
    template.write_text(LOOP + extra + GEN)
    capsys.readouterr()
    assert main(["audit", str(data), "--chat-template", str(template)]) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err and out.err.count("\n") == 1 and out.out == "", out.err
    assert out.err.startswith(f"orpo audit: error: {template}: ") and message in out.err, out.err


def test_a_template_file_that_is_not_utf8_names_its_line_and_byte(tmp_path, capsys, stories_tokenizer):
    template = tmp_path / "latin.jinja"
    template.write_bytes(LOOP.encode() + b"\n\xff\xfe\x00bad" + GEN.encode())
    with pytest.raises(ChatTemplateError, match=rf"latin.jinja: not UTF-8 text \(line 2, byte {len(LOOP) + 1}"):
        resolve_chat_template(str(template), stories_tokenizer)
    data = write_short_pairs(tmp_path / "d.jsonl", 4)
    capsys.readouterr()
    assert main(["audit", str(data), "--chat-template", str(template)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "latin.jinja: not UTF-8" in err


@pytest.mark.parametrize(("branch", "message"), [
    ("{{ messages.append(1) }}", "SecurityError|access to attribute 'append' of 'list' object is unsafe"),
    ("{{ 1 // 0 }}", "ZeroDivisionError"),
    ("{{ range(10 ** 6) | list | length }}", "OverflowError: Range too big"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{ raise_exception('no long prompts') }}", "no long prompts"),
])
def test_a_template_failing_on_some_rows_only_is_a_config_error_when_rendered(tmp_path, stories_tokenizer, branch,
                                                                               message):
    """The check at load time cannot see a branch that only some rows take: the render reports it."""
    template = tmp_path / "odd.jinja"
    template.write_text(LOOP + "{% if messages[0]['content'] | length > 20 %}" + branch + "{% endif %}" + GEN)
    resolved = resolve_chat_template(str(template), stories_tokenizer)
    assert render_pair(Pair(prompt="Hi", chosen="Yo", rejected="No"), resolved, stories_tokenizer).prompt
    with pytest.raises(ConfigError, match=rf"chat template '.*odd.jinja' failed to render: .*({message})"):
        render_pair(Pair(prompt="Hi" * 20, chosen="Yo", rejected="No"), resolved, stories_tokenizer)


def test_a_template_that_refuses_a_system_turn_is_not_refused_here(tmp_path, stories_tokenizer):
    """The load-time render is a probe: only the sandbox's refusal fails it, not the template's own checks."""
    template = tmp_path / "strict.jinja"
    template.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
                        + LOOP + GEN)
    resolved = resolve_chat_template(str(template), stories_tokenizer)
    assert render_pair(Pair(prompt="Hi", chosen="Yo", rejected="No"), resolved, stories_tokenizer).chosen == \
        "Yo</assistant>"


def test_a_template_that_fails_every_render_is_one_line_in_audit(tmp_path, capsys):
    """Without --model the audit renders the template in its own sandbox; a template that cannot render
    at all (``{{ 1/0 }}``) is named there, not a ZeroDivisionError traceback."""
    data = write_short_pairs(tmp_path / "d.jsonl", 4)
    template = tmp_path / "broken.jinja"
    template.write_text(LOOP + "{{ 1/0 }}" + GEN)
    capsys.readouterr()
    assert main(["audit", str(data), "--chat-template", str(template)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "ZeroDivisionError" in err, err
