"""Chat templates: resolution, prompt/response split, generation prompt, EOS and BOS handling."""

from __future__ import annotations

import copy
import logging

import pytest

from orpo.data.formats import Pair
from orpo.data.templates import (
    ChatTemplateError,
    render_pair,
    render_prompt,
    resolve_chat_template,
    split_hh_transcript,
)
from orpo.data.tokenize import Limits, encode_rendered

GENERATION_PROMPT = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "zephyr": "<|assistant|>\n",
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "zephyr": "</s>"}

CHAT = Pair(
    prompt=[
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a story."},
    ],
    chosen="Once upon a time, a cat found a hat.",
    rejected="No.",
)
HH = Pair(
    prompt="\n\nHuman: What is a cat?\n\nAssistant: An animal.\n\nHuman: Is it nice?\n\nAssistant:",
    chosen=" Yes, cats are often nice.",
    rejected=" Cats are bad.",
)
LIMITS = Limits(max_length=2048, prompt_budget=2047)


@pytest.mark.parametrize("name", ["chatml", "llama3", "zephyr"])
@pytest.mark.parametrize("pair", [CHAT, HH], ids=["messages", "hh"])
def test_builtin_templates_split_prompt_and_response(name, pair, stories_tokenizer):
    tok = stories_tokenizer
    template = resolve_chat_template(name, tok)
    r = render_pair(pair, template, tok)

    # the prompt ends with the generation prompt, once: one more assistant header than assistant turns
    gen = GENERATION_PROMPT[name]
    assert r.prompt.endswith(gen)
    assert r.prompt.count(gen) == 2  # one past assistant turn + the generation prompt
    # each response is exactly what the template appends for that reply, ending at the end of turn
    for response, text in ((pair.chosen, r.chosen), (pair.rejected, r.rejected)):
        assert text.startswith(response.strip())
        assert text.endswith(END_OF_TURN[name]) and text.count(END_OF_TURN[name]) == 1
        assert gen not in text
        full = tok.apply_chat_template(
            [*_messages(pair), {"role": "assistant", "content": response.strip()}],
            chat_template=template.jinja, tokenize=False,
        )
        assert full.rstrip() == r.prompt + text

    # tokenized: identical prompt tokens, EOS exactly once at the end, BOS exactly once at the start
    (enc,) = encode_rendered([r], tok, LIMITS)
    assert enc.kept and not enc.truncated
    c, r_ids = enc.chosen_input_ids, enc.rejected_input_ids
    assert c[: enc.chosen_prompt_len] == r_ids[: enc.rejected_prompt_len]
    for ids, plen in ((c, enc.chosen_prompt_len), (r_ids, enc.rejected_prompt_len)):
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids[-1] == tok.eos_token_id and ids[plen:].count(tok.eos_token_id) == 1
        assert tok.decode(ids[:plen]).endswith(gen)


def _messages(pair: Pair) -> list[dict]:
    if isinstance(pair.prompt, str):
        return split_hh_transcript(pair.prompt)
    return list(pair.prompt)


def test_llama3_emits_bos_itself_and_tokens_have_one(stories_tokenizer):
    tok = stories_tokenizer
    r = render_pair(CHAT, resolve_chat_template("llama3", tok), tok)
    assert r.prompt.startswith(tok.bos_token)
    (enc,) = encode_rendered([r], tok, LIMITS)
    assert enc.chosen_input_ids[:2].count(tok.bos_token_id) == 1
    assert enc.chosen_input_ids.count(tok.bos_token_id) == 1


def test_zephyr_response_keeps_its_own_eos_and_gets_no_second(stories_tokenizer):
    tok = stories_tokenizer
    r = render_pair(CHAT, resolve_chat_template("zephyr", tok), tok)
    assert r.chosen == CHAT.chosen + tok.eos_token  # the "\n" after the final EOS is stripped
    (enc,) = encode_rendered([r], tok, LIMITS)
    assert enc.chosen_input_ids[-2:] != [tok.eos_token_id] * 2


def test_hh_transcript_becomes_turns():
    assert split_hh_transcript(HH.prompt) == [
        {"role": "user", "content": "What is a cat?"},
        {"role": "assistant", "content": "An animal."},
        {"role": "user", "content": "Is it nice?"},
    ]
    # consecutive turns of one speaker merge; non-transcripts are not split
    assert split_hh_transcript("\n\nHuman: a\n\nHuman: b\n\nAssistant:") == [{"role": "user", "content": "a\n\nb"}]
    assert split_hh_transcript("Translate: Human: hi") is None
    assert split_hh_transcript("\n\nHuman: hi\n\nAssistant: done") is None  # no open assistant turn


def test_hh_pair_through_a_chat_template_loses_the_leading_space(stories_tokenizer):
    r = render_pair(HH, resolve_chat_template("chatml", stories_tokenizer), stories_tokenizer)
    assert r.prompt.startswith("<|im_start|>user\nWhat is a cat?<|im_end|>\n<|im_start|>assistant\nAn animal.")
    assert r.chosen == "Yes, cats are often nice.<|im_end|>"


def test_plain_string_prompt_is_one_user_message(stories_tokenizer):
    pair = Pair(prompt="Write a poem.", chosen="Roses.", rejected="No.")
    r = render_pair(pair, resolve_chat_template("chatml", stories_tokenizer), stories_tokenizer)
    assert r.prompt == "<|im_start|>user\nWrite a poem.<|im_end|>\n<|im_start|>assistant\n"


def test_none_keeps_text_verbatim_and_writes_transcripts(stories_tokenizer):
    none = resolve_chat_template("none", stories_tokenizer)
    assert none.jinja is None
    r = render_pair(HH, none, stories_tokenizer)
    assert (r.prompt, r.chosen, r.rejected) == (HH.prompt, HH.chosen, HH.rejected)
    r = render_pair(CHAT, none, stories_tokenizer)
    assert r.prompt == (
        "System: Be kind.\n\nUser: Hi there\n\nAssistant: Hello! How can I help?\n\n"
        "User: Tell me a story.\n\nAssistant:"
    )
    assert r.chosen == " " + CHAT.chosen
    assert render_prompt(CHAT, none, stories_tokenizer) == r.prompt


def test_default_is_the_tokenizers_own_template(stories_tokenizer):
    tok = copy.deepcopy(stories_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    template = resolve_chat_template(None, tok)
    assert template.name == "tokenizer" and template.jinja == tok.chat_template
    assert resolve_chat_template("tokenizer", tok) == template
    r = render_pair(Pair(prompt="Hi", chosen="Hello", rejected="Go"), template, tok)
    assert (r.prompt, r.chosen, r.rejected) == ("[user] Hi\n[assistant] ", "Hello", "Go")


def test_default_without_a_template_is_plain_text_with_a_warning(stories_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="orpo.data.templates"):
        template = resolve_chat_template(None, stories_tokenizer)
    assert template.name == "none" and template.jinja is None
    assert "no chat template" in caplog.text
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        resolve_chat_template("tokenizer", stories_tokenizer)


def test_template_from_a_jinja_file(tmp_path, stories_tokenizer):
    path = tmp_path / "mine.jinja"
    path.write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    template = resolve_chat_template(str(path), stories_tokenizer)
    assert template.name == str(path)
    r = render_pair(Pair(prompt="Hi", chosen="Yo", rejected="No"), template, stories_tokenizer)
    assert (r.prompt, r.chosen) == ("<user>Hi</user><assistant>", "Yo</assistant>")


def test_template_errors_are_clear(tmp_path, stories_tokenizer):
    with pytest.raises(ChatTemplateError, match=r"unknown chat template 'chatlm'.*chatml, llama3, zephyr"):
        resolve_chat_template("chatlm", stories_tokenizer)
    with pytest.raises(ChatTemplateError, match="not found: .*missing.jinja"):
        resolve_chat_template(str(tmp_path / "missing.jinja"), stories_tokenizer)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }")
    with pytest.raises(ChatTemplateError, match=r"bad.jinja: Jinja syntax error at line 2"):
        resolve_chat_template(str(bad), stories_tokenizer)


def test_template_whose_prompt_is_not_a_prefix_is_rejected(tmp_path, stories_tokenizer):
    path = tmp_path / "odd.jinja"
    path.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant says:{% endif %}"
    )
    template = resolve_chat_template(str(path), stories_tokenizer)
    with pytest.raises(ChatTemplateError, match=r"odd.jinja.*does not render the prompt .* as a prefix"):
        render_pair(Pair(prompt="Hi", chosen="Yo", rejected="No"), template, stories_tokenizer)
