"""Batched, left-padded generation equals one prompt at a time, token for token (stories260K)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from orpo.generation import Sampling, cut_at_eos, generate, left_pad

STORIES = ["Once upon a time", "Lily and Tom went to the park. They saw a big", "The dog",
           "One day, a little girl named Sue found a shiny red ball in the garden. She",
           "Tim was sad because", "The sun", "Ben had a toy car. He liked to play with it every day. One day",
           "Mom said"]


@pytest.fixture(scope="module")
def model_and_prompts(stories_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32)
    prompts = [tok(s)["input_ids"] for s in STORIES]
    assert len({len(p) for p in prompts}) > 4, "the prompts must differ in length for padding to matter"
    return model, tok, prompts


def _one_at_a_time(model, prompts, n, eos):
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=eos, eos_token_id=eos)
        out.append(cut_at_eos(gen[0, len(p):].tolist(), eos))
    return out


@pytest.mark.parametrize("batch_size", [3, 8])
def test_batched_greedy_equals_one_prompt_at_a_time(model_and_prompts, batch_size):
    model, tok, prompts = model_and_prompts
    alone = _one_at_a_time(model, prompts, 24, tok.eos_token_id)
    batched = generate(model, prompts, 24, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       batch_size=batch_size)
    assert batched == alone
    assert all(len(x) > 0 for x in batched)


def test_lockstep_equals_generate_and_runs_every_step(model_and_prompts):
    """The sharded path's own KV-cache loop: same tokens, and always max_new_tokens forwards per batch."""
    model, tok, prompts = model_and_prompts
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        lock = generate(model, prompts, 12, pad_token_id=None, eos_token_id=tok.eos_token_id, batch_size=4,
                        lockstep=True)
    finally:
        hook.remove()
    assert lock == generate(model, prompts, 12, pad_token_id=None, eos_token_id=tok.eos_token_id, batch_size=4)
    assert len(calls) == 2 * 12


def test_sampling_is_seeded_and_keeps_the_callers_random_state(model_and_prompts):
    model, tok, prompts = model_and_prompts
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)

    def sample(seed):
        return generate(model, prompts, 16, pad_token_id=None, eos_token_id=tok.eos_token_id,
                        sampling=Sampling(temperature=1.0, seed=seed))

    a, b, c = sample(1), sample(1), sample(2)
    assert a == b and a != c
    assert torch.equal(torch.rand(1), before)


def test_left_padding_puts_the_prompt_last():
    ids, mask = left_pad([[5, 6, 7], [9]], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_bad_arguments_are_refused(model_and_prompts):
    model, tok, prompts = model_and_prompts
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[]], 4, pad_token_id=None, eos_token_id=tok.eos_token_id)
    with pytest.raises(ValueError, match="greedy only"):
        generate(model, prompts, 4, pad_token_id=None, eos_token_id=tok.eos_token_id, lockstep=True,
                 sampling=Sampling(temperature=0.7))


def test_cli_generates_a_file_of_prompts_in_order(stories_dir, tmp_path, capsys):
    """`orpo generate --prompts`: every shape of row, batched, each reply equal to `--prompt` alone."""
    import json

    from orpo.cli import main

    rows = [{"prompt": "Once upon a time"}, {"messages": [{"role": "user", "content": "The dog"}]},
            {"instruction": "Tim was sad", "input": "because"}, {"prompt": "The sun", "system": "Be brief."}]
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "replies.jsonl"
    common = ["--model", str(stories_dir), "--chat-template", "none", "--max-new-tokens", "8"]
    assert main(["generate", *common, "--prompts", str(f), "--out", str(out), "--batch-size", "3"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["row"] for g in got] == [1, 2, 3, 4] and got[1]["prompt"] == rows[1]["messages"]
    capsys.readouterr()
    assert main(["generate", *common, "--prompt", "Once upon a time"]) == 0
    assert capsys.readouterr().out.strip() == got[0]["completion"] != ""


def test_cli_names_a_bad_prompt_row_and_writes_nothing(stories_dir, tmp_path, capsys):
    from orpo.cli import main

    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "fine"}\n{"messages": [{"role": "user", "content": "hi"}, '
                 '{"role": "assistant", "content": "yo"}]}\n')
    out = tmp_path / "replies.jsonl"
    assert main(["generate", "--model", str(stories_dir), "--prompts", str(f), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{f} line 2: field 'messages' ends in a 'assistant' turn" in err and not out.exists()
    assert main(["generate", "--model", str(stories_dir), "--prompts", str(f), "--out",
                 str(tmp_path / "no" / "x.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
