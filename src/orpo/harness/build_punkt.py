"""Build the Punkt English sentence model that lm-eval's IFEval checks need, from text we may ship.

lm-eval's IFEval checkers count sentences and words with NLTK's ``punkt_tab`` model, which NLTK
downloads at import time; no PyPI package carries it, and tests run offline. So orpo ships its own:
NLTK's own ``PunktTrainer`` run on the Anthropic HH-RLHF dialogues (MIT), written in the
``punkt_tab`` format that ``nltk.tokenize.punkt.load_punkt_params`` reads. Sorted lines, so the
same input always gives the same bytes (the files are committed).

    python -m orpo.harness.build_punkt [HH_JSONL_GZ] [OUT_DIR]
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

DEFAULT_SOURCE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "hh-rlhf" / "harmless-dev.jsonl.gz"
DEFAULT_OUT = Path(__file__).resolve().parent / "nltk_data" / "tokenizers" / "punkt_tab" / "english"


def training_text(source: Path) -> str:
    """Every chosen and rejected dialogue, turn markers removed: they are not English sentences."""
    texts = []
    with gzip.open(source, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for key in ("chosen", "rejected"):
                texts.append(row[key].replace("\n\nHuman:", "\n\n").replace("\n\nAssistant:", "\n\n"))
    return "\n\n".join(texts)


def build(source: Path = DEFAULT_SOURCE, out: Path = DEFAULT_OUT) -> Path:
    """Train Punkt on ``source`` and write the four ``punkt_tab`` files into ``out``."""
    from nltk.tokenize.punkt import PunktTrainer

    trainer = PunktTrainer()
    trainer.train(training_text(source), finalize=True)
    params = trainer.get_params()
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "abbrev_types.txt": sorted(params.abbrev_types),
        "sent_starters.txt": sorted(params.sent_starters),
        "collocations.tab": sorted("\t".join(pair) for pair in params.collocations),
        "ortho_context.tab": sorted(f"{word}\t{flags}" for word, flags in params.ortho_context.items()),
    }
    for name, lines in files.items():
        (out / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="")
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    written = build(Path(args[0]) if args else DEFAULT_SOURCE, Path(args[1]) if len(args) > 1 else DEFAULT_OUT)
    print(f"punkt_tab written to {written}")
