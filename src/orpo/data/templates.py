"""Chat templates: turn a ``Pair`` into prompt text and two response texts.

The prompt is rendered once and shared byte-for-byte by chosen and rejected, so the two
sequences can only differ after the prompt. A response is what the template adds to that
prompt when the assistant turn is appended (``full[len(prompt):]``), so the prompt ends with the
generation prompt exactly once and the response carries the template's end-of-turn text.

Plain text (template ``none``) keeps string prompts and responses verbatim. A message-list
prompt becomes a transcript in the Anthropic HH shape::

    System: {system}\\n\\nUser: {user}\\n\\nAssistant: {reply}\\n\\nUser: {user}\\n\\nAssistant:

and the response follows after one space (``" " + response``).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from orpo.config import ConfigError
from orpo.data.formats import Message, Pair

logger = logging.getLogger(__name__)

BUILTIN_TEMPLATES = ("chatml", "llama3", "zephyr")
CHOICES = ("none", "tokenizer", *BUILTIN_TEMPLATES, "path/to/template.jinja")
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# HH transcripts: "\n\nHuman: ...\n\nAssistant: ...", ending with an open "\n\nAssistant:" turn
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class ChatTemplateError(ConfigError):
    """A chat template that cannot be found, parsed or used to split prompt from response."""


@dataclass(frozen=True)
class ChatTemplate:
    """A named chat template; ``jinja`` None means plain text (no template)."""

    name: str
    jinja: str | None

    @property
    def is_plain(self) -> bool:
        return self.jinja is None


@dataclass(frozen=True)
class RenderedPair:
    """Texts ready to tokenize: ``prompt + chosen`` and ``prompt + rejected`` are the two sequences."""

    prompt: str
    chosen: str
    rejected: str


# ------------------------------------------------------------------------------ resolution


def builtin_template(name: str) -> ChatTemplate:
    """One of the templates shipped in ``orpo/data/templates/``."""
    text = resources.files("orpo.data").joinpath(f"templates/{name}.jinja").read_text(encoding="utf-8")
    return ChatTemplate(name=name, jinja=text)


def tokenizer_template(tokenizer) -> str | None:
    """The tokenizer's own template text (the ``default`` one when it has several), or None."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    return own or None


def resolve_chat_template(setting: str | None, tokenizer) -> ChatTemplate:
    """``model.chat_template`` -> a ChatTemplate.

    None: the tokenizer's own template, else plain text with a warning. ``tokenizer`` insists on
    the tokenizer's own. ``none``: plain text. chatml / llama3 / zephyr: built-ins. A path ending
    in ``.jinja``: that file.
    """
    if setting is None or setting == "tokenizer":
        own = tokenizer_template(tokenizer)
        if own is not None:
            return ChatTemplate(name="tokenizer", jinja=_checked(own, "the tokenizer's chat template"))
        if setting == "tokenizer":
            raise ChatTemplateError(
                "chat_template 'tokenizer': this tokenizer has no chat template; "
                f"choose one of {', '.join(CHOICES)}"
            )
        logger.warning(
            "the tokenizer has no chat template: using plain text (chat_template: none); "
            "set model.chat_template to chatml, llama3, zephyr or a .jinja file to use one"
        )
        return ChatTemplate(name="none", jinja=None)
    if setting == "none":
        return ChatTemplate(name="none", jinja=None)
    if setting in BUILTIN_TEMPLATES:
        return builtin_template(setting)
    if setting.endswith(".jinja"):
        path = Path(setting).expanduser()
        if not path.is_file():
            raise ChatTemplateError(f"chat template file not found: {setting}")
        return ChatTemplate(name=setting, jinja=_checked(_read_template(path, setting), setting))
    raise ChatTemplateError(f"unknown chat template {setting!r}; choose one of {', '.join(CHOICES)}")


def _read_template(path: Path, where: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ChatTemplateError(f"{where}: cannot read: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ChatTemplateError(f"{where}: not UTF-8 text (line {line}, byte {err.start}: {err.reason})") from None


@functools.cache
def _sandbox():
    """The sandbox transformers renders chat templates in (immutable: no ``list.append``), with its
    ``raise_exception``."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env


def _checked(text: str, where: str) -> str:
    """Check the template now, so a problem names the file and line before any data work.

    A syntax error, and a reach past the sandbox (``''.__class__``, ``cycler.__init__.__globals__``,
    ``messages.append(...)``): rendering refuses those with a SecurityError, found here by reading
    the template and by rendering a small conversation. Other errors a render may raise depend on
    the data, and are reported when it is rendered.
    """
    import jinja2
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError

    env = _sandbox()
    try:
        tree = env.parse(text)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"{where}: Jinja syntax error at line {err.lineno}: {err.message}") from None
    reads = [(node.lineno, name) for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter))
             if (name := _dunder(node))]
    if reads:
        line = min(n for n, _ in reads)
        names = ", ".join(dict.fromkeys(repr(name) for n, name in reversed(reads) if n == line))
        raise ChatTemplateError(f"{where}: line {line} reads {names}, which the Jinja sandbox refuses "
                                "(a template may not reach Python internals)")
    template = env.from_string(text)
    probes = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
              {"role": "assistant", "content": "a"}]
    for messages in (probes, probes[1:], probes[1:2]):
        for add_generation_prompt in (False, True):
            try:
                template.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token="",
                                eos_token="")
            except SecurityError as err:
                raise ChatTemplateError(f"{where}: refused by the Jinja sandbox: {err}") from None
            except Exception:  # data-dependent (a template that refuses a system turn): the real render tells
                pass
    return text


def _dunder(node) -> str | None:
    """The ``__name`` a node reads as an attribute (``x.__class__``, ``x['__class__']``, ``x|attr('__class__')``)."""
    from jinja2 import nodes

    if isinstance(node, nodes.Getattr):
        name = node.attr
    elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        name = node.arg.value
    elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args and isinstance(node.args[0], nodes.Const):
        name = node.args[0].value
    else:
        return None
    return name if isinstance(name, str) and name.startswith("__") else None


# ------------------------------------------------------------------------------ rendering


def render_pair(pair: Pair, template: ChatTemplate, tokenizer) -> RenderedPair:
    """Render ``pair``; chosen and rejected share the one prompt rendering."""
    if template.is_plain:
        return _render_plain(pair)
    messages, chosen, rejected = chat_messages(pair)
    prompt = _apply(template, tokenizer, messages, add_generation_prompt=True)
    return RenderedPair(
        prompt=prompt,
        chosen=_response(template, tokenizer, messages, chosen, prompt),
        rejected=_response(template, tokenizer, messages, rejected, prompt),
    )


def render_prompt(pair: Pair, template: ChatTemplate, tokenizer) -> str:
    """The prompt text alone, ending with the generation prompt (for generation)."""
    if template.is_plain:
        return _plain_prompt(pair.prompt)
    messages, _, _ = chat_messages(pair)
    return _apply(template, tokenizer, messages, add_generation_prompt=True)


def chat_messages(pair: Pair) -> tuple[list[Message], str, str]:
    """Messages for a chat template, plus the two responses.

    A string prompt is one user message, except an HH transcript, which becomes its real
    user/assistant turns (and the responses lose HH's leading space).
    """
    if not isinstance(pair.prompt, str):
        return [Message(role=m["role"], content=m["content"]) for m in pair.prompt], pair.chosen, pair.rejected
    turns = split_hh_transcript(pair.prompt)
    if turns is None:
        return [Message(role="user", content=pair.prompt)], pair.chosen, pair.rejected
    return turns, pair.chosen.lstrip(), pair.rejected.lstrip()


def split_hh_transcript(text: str) -> list[Message] | None:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` -> user a, assistant b, user c.

    None when ``text`` is not such a transcript (it must start with a Human turn and end with an
    empty Assistant turn). Consecutive turns of one speaker are merged, so strict templates that
    require alternating roles still accept them.
    """
    stripped = text.strip()
    marks = list(_HH_TURN.finditer(stripped))
    if not marks or marks[0].start() != 0 or marks[0].group(1) != "Human":
        return None
    last = marks[-1]
    if last.group(1) != "Assistant" or stripped[last.end() :].strip():
        return None
    messages: list[Message] = []
    for mark, nxt in zip(marks[:-1], marks[1:], strict=True):
        role = _HH_ROLES[mark.group(1)]
        content = stripped[mark.end() : nxt.start()].strip()
        if messages and messages[-1]["role"] == role:
            messages[-1] = Message(role=role, content=messages[-1]["content"] + "\n\n" + content)
        else:
            messages.append(Message(role=role, content=content))
    return messages


def _render_plain(pair: Pair) -> RenderedPair:
    if isinstance(pair.prompt, str):
        return RenderedPair(prompt=pair.prompt, chosen=pair.chosen, rejected=pair.rejected)
    return RenderedPair(prompt=_plain_prompt(pair.prompt), chosen=" " + pair.chosen, rejected=" " + pair.rejected)


def _plain_prompt(prompt: str | list[Message]) -> str:
    if isinstance(prompt, str):
        return prompt
    turns = [f"{PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in prompt]
    return "\n\n".join([*turns, "Assistant:"])


# What a template's own code can raise while rendering (a division by zero, a range over the
# sandbox's limit, a macro calling itself); TemplateError includes the sandbox's SecurityError.
_RENDER_ERRORS = (ArithmeticError, LookupError, TypeError, ValueError, RecursionError)


def _apply(template: ChatTemplate, tokenizer, messages: list[Any], add_generation_prompt: bool) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template.jinja, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except (jinja2.TemplateError, *_RENDER_ERRORS) as err:
        detail = err if isinstance(err, jinja2.TemplateError) else f"{type(err).__name__}: {err}"
        raise ChatTemplateError(f"chat template {template.name!r} failed to render: {detail}") from err


def _response(template: ChatTemplate, tokenizer, messages: list[Message], response: str, prompt: str) -> str:
    """The text the assistant turn adds after the prompt, without trailing whitespace after its end."""
    full = _apply(template, tokenizer, [*messages, Message(role="assistant", content=response)], False)
    if not full.startswith(prompt):
        raise ChatTemplateError(
            f"chat template {template.name!r} does not render the prompt (with the generation prompt) as a "
            "prefix of the conversation with the reply, so prompt and response cannot be split; "
            f"prompt ends {prompt[-60:]!r}, conversation there reads {full[max(0, len(prompt) - 60) : len(prompt)]!r}"
        )
    text = full[len(prompt) :].rstrip()
    if not text:
        raise ChatTemplateError(f"chat template {template.name!r} renders nothing for the assistant's reply")
    return text
