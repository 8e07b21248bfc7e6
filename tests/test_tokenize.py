"""Tokenization on the real stories260K tokenizer: boundary merges, BOS/EOS once, safe truncation."""

from __future__ import annotations

import pytest

from orpo.data.formats import Pair
from orpo.data.templates import RenderedPair, resolve_chat_template
from orpo.data.tokenize import (
    NO_ROOM_FOR_RESPONSE,
    RESPONSE_TOO_SHORT,
    Limits,
    SpecialTokens,
    encode_pairs,
    encode_prompt,
    encode_rendered,
    encode_sequences,
    pair_columns,
    pairs_from_columns,
    tokenize_batch,
)

WIDE = Limits(max_length=2048, prompt_budget=2047)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _one(tok, prompt: str, chosen: str, rejected: str, limits: Limits = WIDE):
    (enc,) = encode_rendered([RenderedPair(prompt, chosen, rejected)], tok, limits)
    return enc


def test_tokenizer_facts_the_tests_rely_on(stories_tokenizer):
    tok = stories_tokenizer
    assert tok.is_fast and tok("x")["input_ids"][0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert SpecialTokens.of(tok) == SpecialTokens(bos_id=1, bos_text="<s>", eos_id=2, eos_text="</s>")


@pytest.mark.parametrize(
    ("prompt", "response", "prompt_tokens"),
    [
        ("Once upon a ti", "me there was", 3),  # mid-word: '▁time' straddles the boundary -> response
        ("Once upon a time ", "there was", 4),  # trailing space: '▁there' carries it -> response
        ("Once upon a time", " there was", 4),  # clean boundary
    ],
)
def test_prompt_and_response_are_tokenized_together(stories_tokenizer, prompt, response, prompt_tokens):
    tok = stories_tokenizer
    joint = _ids(tok, prompt + response)
    if prompt == "Once upon a ti":  # the case only matters because separate tokenization differs
        assert _ids(tok, prompt) + _ids(tok, response) != joint
    enc = _one(tok, prompt, response, " x")
    assert enc.chosen_input_ids == [tok.bos_token_id, *joint, tok.eos_token_id]
    assert enc.chosen_prompt_len == 1 + prompt_tokens
    assert tok.decode(enc.chosen_input_ids[1 : enc.chosen_prompt_len]) in prompt
    assert tok.convert_ids_to_tokens(enc.chosen_input_ids[enc.chosen_prompt_len :])[-3:-1] == ["▁there", "▁was"]


def test_slow_tokenizer_fallback_finds_the_same_boundaries(stories_tokenizer):
    """Without offsets, the boundary is the common prefix of prompt-alone and joint ids."""
    tok = stories_tokenizer

    class NoOffsets(type(tok)):
        is_fast = False  # only hides the offsets path; tokenization itself is the real one

    slow = NoOffsets.__new__(NoOffsets)
    slow.__dict__.update(tok.__dict__)
    prompts = ["Once upon a ti", "Once upon a time ", "\n\nHuman: hi\n\nAssistant:", "The ca", "The ca"]
    responses = ["me there was", "there was", " Hello there.", "t sat", " dog ran"]
    assert encode_sequences(prompts, responses, slow) == encode_sequences(prompts, responses, tok)


def test_bos_once_and_eos_once(stories_tokenizer):
    tok = stories_tokenizer
    enc = _one(tok, "Hello", " world", " there")
    for ids in (enc.chosen_input_ids, enc.rejected_input_ids):
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    # text that already has them (a template emitting BOS, a response ending in EOS) gets no second
    enc = _one(tok, "<s>Hello", " world</s>", " there</s>\n".rstrip())
    assert enc.chosen_input_ids.count(tok.bos_token_id) == 1 and enc.chosen_input_ids[0] == tok.bos_token_id
    assert enc.chosen_input_ids.count(tok.eos_token_id) == 1 and enc.chosen_input_ids[-1] == tok.eos_token_id
    assert encode_prompt("Hello", tok) == [tok.bos_token_id, *_ids(tok, "Hello")]
    assert encode_prompt("<s>Hello", tok) == _ids(tok, "<s>Hello")


def test_long_prompt_is_cut_from_the_left_and_response_from_the_right(stories_tokenizer):
    tok = stories_tokenizer
    prompt = " ".join(f"word{i}" for i in range(300)) + " The end. Answer:"
    chosen = " " + " ".join(["yes"] * 200)
    limits = Limits(max_length=64, prompt_budget=40)
    enc = _one(tok, prompt, chosen, " no", limits)
    full = [tok.bos_token_id, *_ids(tok, prompt + chosen), tok.eos_token_id]
    untruncated_prompt_len = 1 + len(_ids(tok, prompt))
    assert enc.truncated and enc.prompt_tokens == untruncated_prompt_len
    ids, plen = enc.chosen_input_ids, enc.chosen_prompt_len
    assert plen == 40 and len(ids) == 64
    assert ids[0] == tok.bos_token_id  # BOS kept, the cut is after it
    assert ids[1:plen] == full[untruncated_prompt_len - 39 : untruncated_prompt_len]  # the prompt's end
    assert tok.decode(ids[1:plen]).endswith("The end. Answer:")
    assert ids[plen:] == full[untruncated_prompt_len : untruncated_prompt_len + 24]  # the response's start
    assert ids[-1] != tok.eos_token_id  # truncated responses lose their EOS
    # the short rejected response is whole, after the same prompt tokens
    assert enc.rejected_input_ids[: enc.rejected_prompt_len] == ids[:plen]
    assert enc.rejected_input_ids[-1] == tok.eos_token_id


def test_prompt_filling_max_length_keeps_a_response_token(stories_tokenizer):
    """TRL #6548: a prompt alone longer than max_length must never give an empty response."""
    tok = stories_tokenizer
    prompt = "Once upon a time " * 200
    enc = _one(tok, prompt, "there was a cat.", "no.", Limits(max_length=64, prompt_budget=63))
    assert enc.kept
    for ids, plen in ((enc.chosen_input_ids, enc.chosen_prompt_len), (enc.rejected_input_ids, enc.rejected_prompt_len)):
        assert len(ids) == 64 and plen == 63 and len(ids) - plen == 1


def test_pairs_without_room_or_with_short_responses_are_dropped(stories_tokenizer):
    tok = stories_tokenizer
    prompt = "Once upon a time " * 200
    # max_prompt_length leaves 2 tokens but 4 are required
    enc = _one(tok, prompt, "there was a cat.", "no.", Limits(max_length=64, prompt_budget=62, min_response_tokens=4))
    assert enc.drop_reason == NO_ROOM_FOR_RESPONSE
    # rejected " no" is 2 tokens + EOS < 5, even without truncation
    enc = _one(tok, "Hi.", " there was a big cat.", " no", Limits(max_length=64, prompt_budget=59, min_response_tokens=5))
    assert enc.drop_reason == RESPONSE_TOO_SHORT and not enc.kept


def test_chosen_and_rejected_lose_the_same_prompt_tokens(stories_tokenizer):
    """'The ca' + 't sat' merges into '▁c','at' while 'The ca' + ' dog' keeps '▁c','a': the prompt
    lengths differ by one, and the cut must still remove the same leading text from both."""
    tok = stories_tokenizer
    enc = _one(tok, "The ca", "t sat", " dog ran", Limits(max_length=16, prompt_budget=3))
    c, r = enc.chosen_input_ids, enc.rejected_input_ids
    assert (enc.chosen_prompt_len, enc.rejected_prompt_len) == (2, 3)
    assert tok.convert_ids_to_tokens(c[: enc.chosen_prompt_len]) == ["<s>", "▁c"]
    assert tok.convert_ids_to_tokens(r[: enc.rejected_prompt_len]) == ["<s>", "▁c", "a"]
    assert enc.truncated


def test_encode_pairs_and_dataset_map_agree(stories_tokenizer):
    import datasets

    tok = stories_tokenizer
    template = resolve_chat_template("chatml", tok)
    pairs = [
        Pair(prompt="Tell me a story.", chosen="Once upon a time.", rejected="No."),
        Pair(prompt=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
             chosen="Hello!", rejected="Go away."),
    ]
    cols = pair_columns(pairs)
    assert pairs_from_columns(cols) == pairs
    direct = encode_pairs(pairs, template, tok, WIDE)
    ds = datasets.Dataset.from_dict(cols).map(
        tokenize_batch, batched=True, with_indices=True, remove_columns=list(cols),
        fn_kwargs={"template": template, "tokenizer": tok, "limits": WIDE},
    )
    assert ds["chosen_input_ids"] == [e.chosen_input_ids for e in direct]
    assert ds["rejected_prompt_len"] == [e.rejected_prompt_len for e in direct]
    assert ds["drop_reason"] == ["", ""]


def test_adaptive_prompt_budget_when_max_prompt_length_is_unset(stories_tokenizer):
    """Short responses stay whole and the prompt takes the rest; long ones leave the prompt half."""
    tok = stories_tokenizer
    prompt = "Once upon a time " * 200
    limits = Limits(max_length=64)  # prompt_budget None: adaptive
    short = _one(tok, prompt, "there was a cat.", "no.", limits)
    resp_c = len(short.chosen_input_ids) - short.chosen_prompt_len
    assert short.kept and short.chosen_input_ids[-1] == tok.eos_token_id  # whole, EOS kept
    assert len(short.chosen_input_ids) == 64 and short.chosen_prompt_len == 64 - resp_c
    long = _one(tok, prompt, "there was a big cat " * 40, "no.", limits)
    assert long.chosen_prompt_len == long.rejected_prompt_len == 32  # half of max_length
    assert len(long.chosen_input_ids) == 64 and long.chosen_input_ids[-1] != tok.eos_token_id
