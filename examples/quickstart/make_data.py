"""Write the quickstart preference data and its tokenizer (deterministic: same seed, same bytes).

    python examples/quickstart/make_data.py            # writes next to this file
    python examples/quickstart/make_data.py --out DIR  # writes into DIR (tests compare the two)

Every pair follows a rule a fresh model can learn from a few thousand examples: the chosen response
answers correctly or follows the instruction, the rejected one does not. Chosen and rejected have
the same shape and draw from the same words, and every family is balanced so that no token, case or
length is a shortcut: the model has to read the prompt. Families:

- case: "Repeat in capitals: ..." / "Repeat exactly: ..." (copy with or without upper-casing; each
  form is chosen half the time and rejected the other half),
- category: "Name three fruits." (three fruits vs three items of another category),
- arithmetic: "What is 7 plus 5?" (right sum or difference vs off by one to three),
- compare: "Which is larger, 42 or 17?" (the larger vs the smaller; "smaller" asked too),
- parity: "Is 38 even or odd?" (right vs wrong parity),
- capital: "What is the capital of Peru?" (a small fact table: right city vs another table city).

Eval prompts never appear in train, except in the closed families, which have few distinct prompts
(six categories, single-digit arithmetic, the capitals table): there the table itself is what is
learned, and no eval (prompt, chosen, rejected) triple appears in train.

The tokenizer is a byte-level BPE (exact round-trip of any text) trained on the rendered ChatML
conversations, with <s>, </s>, <pad>, <unk>, <|im_start|> and <|im_end|> as special tokens, <s>
added at the start of every sequence (as Llama's does) and a ChatML chat template, saved as a
transformers fast tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
N_TRAIN = 2000
N_EVAL = 200
VOCAB_SIZE = 512

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WORDS = (
    "cat dog sun moon tree bird fish rain snow star road book lamp door milk bread ship hill "
    "leaf rock wind song king cake ring coat boat desk cup box"
).split()
CATEGORIES = {
    "colors": "red blue green yellow black white pink brown".split(),
    "animals": "horse tiger sheep mouse rabbit goat lion bear".split(),
    "fruits": "apple pear plum grape lemon mango peach cherry".split(),
    "tools": "hammer saw drill wrench shovel rake axe chisel".split(),
    "drinks": "water tea coffee juice soda cocoa cider lemonade".split(),
    "vehicles": "car bus train truck bike van tram taxi".split(),
}
CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo", "Egypt": "Cairo",
    "Peru": "Lima", "Kenya": "Nairobi", "Canada": "Ottawa", "Norway": "Oslo", "Chile": "Santiago",
    "Cuba": "Havana", "Greece": "Athens", "Poland": "Warsaw", "India": "Delhi", "Russia": "Moscow",
    "Ireland": "Dublin",
}

Row = dict[str, str]


def case_pair(rng: random.Random) -> Row:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 5)))
    if rng.random() < 0.5:
        return {"prompt": f"Repeat in capitals: {text}", "chosen": text.upper(), "rejected": text}
    return {"prompt": f"Repeat exactly: {text}", "chosen": text, "rejected": text.upper()}


def category_pair(rng: random.Random) -> Row:
    asked, other = rng.sample(sorted(CATEGORIES), 2)

    def three(cat: str) -> str:
        a, b, c = rng.sample(CATEGORIES[cat], 3)
        return f"{a}, {b} and {c}."

    return {"prompt": f"Name three {asked}.", "chosen": three(asked), "rejected": three(other)}


def arithmetic_pair(rng: random.Random) -> Row:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        op, answer = "plus", a + b
    else:
        a, b = max(a, b), min(a, b)
        op, answer = "minus", a - b
    wrong = answer + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if answer + d >= 0])
    return {
        "prompt": f"What is {a} {op} {b}?",
        "chosen": f"{a} {op} {b} is {answer}.",
        "rejected": f"{a} {op} {b} is {wrong}.",
    }


def compare_pair(rng: random.Random) -> Row:
    a, b = rng.sample(range(100), 2)
    word = rng.choice(["larger", "smaller"])
    right = max(a, b) if word == "larger" else min(a, b)
    wrong = a + b - right
    return {
        "prompt": f"Which is {word}, {a} or {b}?",
        "chosen": f"{right} is {word}.",
        "rejected": f"{wrong} is {word}.",
    }


def parity_pair(rng: random.Random) -> Row:
    n = rng.randint(0, 999)
    right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    return {"prompt": f"Is {n} even or odd?", "chosen": f"{n} is {right}.", "rejected": f"{n} is {wrong}."}


def capital_pair(rng: random.Random) -> Row:
    country = rng.choice(sorted(CAPITALS))
    wrong = rng.choice(sorted(c for k, c in CAPITALS.items() if k != country))
    return {
        "prompt": f"What is the capital of {country}?",
        "chosen": f"The capital of {country} is {CAPITALS[country]}.",
        "rejected": f"The capital of {country} is {wrong}.",
    }


# (generator, closed?) A closed family has so few distinct prompts that eval must reuse train's.
FAMILIES: list[tuple[Callable[[random.Random], Row], bool]] = [
    (case_pair, False),
    (category_pair, True),
    (arithmetic_pair, True),
    (compare_pair, False),
    (parity_pair, False),
    (capital_pair, True),
]


def make_splits(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> tuple[list[Row], list[Row]]:
    """Equal shares of every family; eval first, so train can be kept clear of eval's prompts."""
    rng = random.Random(seed)
    eval_rows = _draw(rng, n_eval, exclude_prompts=set(), exclude_rows=set())
    held_out = {r["prompt"] for r, closed in eval_rows if not closed}
    eval_keys = {_key(r) for r, _ in eval_rows}
    train_rows = _draw(rng, n_train, exclude_prompts=held_out, exclude_rows=eval_keys)
    return [r for r, _ in train_rows], [r for r, _ in eval_rows]


def _draw(rng: random.Random, n: int, exclude_prompts: set[str], exclude_rows: set[tuple]) -> list[tuple[Row, bool]]:
    rows: list[tuple[Row, bool]] = []
    for i in range(n):
        make, closed = FAMILIES[i % len(FAMILIES)]
        while True:
            row = make(rng)
            if row["chosen"] != row["rejected"] and row["prompt"] not in exclude_prompts and _key(row) not in exclude_rows:
                break
        rows.append((row, closed))
    rng.shuffle(rows)
    return rows


def _key(row: Row) -> tuple[str, str, str]:
    return row["prompt"], row["chosen"], row["rejected"]


def write_jsonl(rows: list[Row], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def render(row: Row, response: str) -> str:
    """The ChatML text of one conversation (what the tokenizer is trained on)."""
    return f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"


def build_tokenizer(rows: list[Row], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE on the rendered conversations, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [render(r, resp) for r in rows for resp in (r["chosen"], r["rejected"])]
    tok.train_from_iterator(texts, trainer=trainer)
    # Start every sequence with <s>, as Llama tokenizers do: a fixed first token gives a tiny fresh
    # model a place to park attention, and exercises the pipeline's BOS handling.
    bos = SPECIAL_TOKENS.index("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: next to this script)")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train, eval_ = make_splits()
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(eval_, out / "eval.jsonl")
    tok = build_tokenizer(train + eval_)
    tok.save_pretrained(str(out / "tokenizer"))
    print(f"wrote {len(train)} train / {len(eval_)} eval pairs and a {len(tok)}-token tokenizer to {out}")


if __name__ == "__main__":
    main()
