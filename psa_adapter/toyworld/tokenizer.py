"""A word-level CLIP tokenizer for the toy world: every world word is exactly one BPE token.

The files are ordinary CLIP BPE files (``vocab.json`` + ``merges.txt``), so ``CLIPTokenizer.from_pretrained``
loads them like SD1.5's tokenizer. The base vocabulary holds lowercase letters, digits and common punctuation
(each alone and as an end-of-word piece), so text outside the world still tokenizes, one character at a time.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from psa_adapter.utils import atomic_write_text

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Printable ASCII without space maps to itself under CLIP's byte-level encoding, so no byte table is needed.
_BASE_CHARS = string.ascii_lowercase + string.digits + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's greedy BPE: repeatedly merge the adjacent pair with the lowest merge rank."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        rank, _ = min(pairs)
        a, b = next((a, b) for a, b in zip(pieces, pieces[1:]) if ranks.get((a, b)) == rank)
        out, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and pieces[i] == a and pieces[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
    return pieces


def build_word_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges in which each of ``words`` (``[a-z]+``) is a single token ``word</w>``.

    Merges are added until a fixed point: a new merge gets the lowest priority, so it can never change how an
    already-finished word is split, and each word gains at least one merge per pass until it is whole.
    """
    for w in words:
        if not w or any(c not in string.ascii_lowercase for c in w):
            raise ValueError(f"tokenizer word {w!r}: expected one lowercase word [a-z]+")
    tokens = list(_BASE_CHARS) + [c + "</w>" for c in _BASE_CHARS]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while True:
            pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def write_world_tokenizer(directory: str | Path, words: list[str], model_max_length: int = 16) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` into ``directory`` and check them.

    Returns the directory. Raises ``AssertionError`` if the written tokenizer splits any world word.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    vocab, merges = build_word_vocab(words)
    atomic_write_text(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False, indent=0))
    atomic_write_text(directory / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
    }
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2))
    tokenizer = CLIPTokenizer.from_pretrained(str(directory))
    check_single_tokens(tokenizer, words)
    return directory


def check_single_tokens(tokenizer, words: list[str]) -> None:
    """Assert that every word in ``words`` encodes to exactly one token (besides BOS/EOS)."""
    bad = {}
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            bad[w] = tokenizer.convert_ids_to_tokens(ids)
    assert not bad, f"toy tokenizer: these words are not single tokens: {bad}"
