"""The tiny Llama most training tests build from ``model.init`` (51,360 parameters with the
stories260K tokenizer's 512 tokens): big enough to have every part of a real decoder, small
enough that a step takes milliseconds on one CPU thread."""

import json

TINY = {"arch": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64}


WORDS = "the cat sat on a big red mat and then ran to the park with her little dog who liked to play".split()


def write_short_pairs(path, n: int):
    """``n`` short standard-format pairs of varied lengths (HH pairs are all cut to max_length in tiny runs)."""
    lines = []
    for i in range(n):
        words = WORDS[i % 7 :] + WORDS[: i % 5]
        lines.append(json.dumps({"prompt": " ".join(words[: 3 + i % 4]) + "?",
                                 "chosen": " ".join(words[: 2 + (i * 5) % 9]) + ".",
                                 "rejected": " ".join(reversed(words[: 1 + (i * 3) % 11])) + "."}))
    path.write_text("\n".join(lines) + "\n")
    return path
