"""Regenerate the CLIP BPE tokenizer files shipped in core/diffusion/assets/clip_tokenizer.

OpenAI's CLIP tokenizer is defined by one file, `bpe_simple_vocab_16e6.txt.gz` (it ships inside the
clip-anytorch and open_clip_torch wheels). Hugging Face's `CLIPTokenizer.from_pretrained(dir)`
wants it as `vocab.json` + `merges.txt`. This script derives both, following the construction in
CLIP's `simple_tokenizer.py` (the 256 byte symbols, the same with the end-of-word marker, one
token per merge, then the two special tokens), so the ids match the real SD 1.x tokenizer.

Usage: python scripts/make_clip_tokenizer.py PATH/TO/bpe_simple_vocab_16e6.txt.gz
It is run once; the outputs are committed, so nothing here runs at install or test time.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "core" / "diffusion" / "assets" / "clip_tokenizer"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (after its version header line).
NUM_MERGES = 49152 - 256 - 2


def byte_symbols() -> list[str]:
    """The printable stand-in for each of the 256 byte values, in GPT-2/CLIP order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def main(source: str) -> None:
    with gzip.open(source, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8"
    )
    merge_lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (OUT / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(tokens)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_clip_tokenizer.py PATH/TO/bpe_simple_vocab_16e6.txt.gz")
    main(sys.argv[1])
