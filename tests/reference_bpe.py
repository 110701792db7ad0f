"""An independent CLIP tokenizer in plain Python, the reference for minidiffseg.sd.tokenizer (test-only).

Written from the algorithm of openai/CLIP's tokenizer, sharing no code with minidiffseg (which drives the
`tokenizers` library) nor with transformers:

1. clean: Unicode NFC, lower-case (Python's `str.lower`, as CLIP does). openai/CLIP also runs ftfy and
   `html.unescape` first; like SD1.5's transformers tokenizer without ftfy, neither is done here.
2. split into pieces, scanning left to right, the first rule that matches at a position wins: the
   special tokens `<|startoftext|>` / `<|endoftext|>`, the contractions 's 't 're 've 'm 'll 'd, a run
   of letters (Unicode category L*), ONE digit (category N*), a run of anything else that is neither
   whitespace, letter nor digit; whitespace separates pieces and is dropped.
3. each piece's UTF-8 bytes are written with one printable character per byte (the byte→unicode map:
   the 188 printable Latin-1 bytes stand for themselves, the other 68 bytes take chr(256), chr(257), …
   in byte order), and "</w>" is glued to the piece's last character.
4. byte-pair merging: while some adjacent pair of symbols is in the merges list, merge every occurrence
   (left to right) of the pair with the lowest rank (= earliest line of the merges file).
5. ids: the vocabulary is the 256 byte characters (the printable bytes first, then the 68 others), the
   same with "</w>", one token per merge (the
   first 49408 − 2·256 − 2 = 48894 merges of the file), then `<|startoftext|>`, `<|endoftext|>`.
"""

from __future__ import annotations

import gzip
import unicodedata
from pathlib import Path

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
VOCAB_SIZE = 49408  # CLIP's text vocabulary
CONTEXT = 77  # CLIP's context length: BOS + 75 tokens + EOS


PRINTABLE = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # '!'..'~', '¡'..'¬', '®'..'ÿ'


def byte_to_unicode() -> dict[int, str]:
    """byte -> its character, in vocabulary order: the printable bytes first, then the 68 others."""
    table = {b: chr(b) for b in PRINTABLE}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def _letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def _number(ch: str) -> bool:
    return unicodedata.category(ch).startswith("N")


def pieces(text: str) -> list[str]:
    """Step 2 on cleaned text."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        fixed = next((s for s in SPECIAL + CONTRACTIONS if text.startswith(s, i)), None)
        if fixed:
            j = i + len(fixed)
        elif _letter(text[i]):
            j = i + 1
            while j < n and _letter(text[j]):
                j += 1
        elif _number(text[i]):
            j = i + 1
        else:
            j = i + 1
            while j < n and not (text[j].isspace() or _letter(text[j]) or _number(text[j])):
                j += 1
        out.append(text[i:j])
        i = j
    return out


class ReferenceBPE:
    def __init__(self, bpe_gz: str | Path):
        lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
        n_merges = VOCAB_SIZE - 2 * 256 - len(SPECIAL)
        merges = [tuple(line.split()) for line in lines[1:1 + n_merges]]  # line 0: "#version: ..."
        self.rank = {pair: r for r, pair in enumerate(merges)}
        chars = list(byte_to_unicode().values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(p) for p in merges] + list(SPECIAL)
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.bytes = byte_to_unicode()
        self.cache: dict[str, list[str]] = {}

    def bpe(self, piece: str) -> list[str]:
        """Steps 3–4 for one piece: its BPE tokens."""
        if piece not in self.cache:
            chars = [self.bytes[b] for b in piece.encode("utf-8")]
            word = chars[:-1] + [chars[-1] + "</w>"]
            while len(word) > 1:
                pairs = {(a, b) for a, b in zip(word, word[1:])}
                best = min(pairs, key=lambda p: self.rank.get(p, float("inf")))
                if best not in self.rank:
                    break
                merged, i = [], 0
                while i < len(word):
                    if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
            self.cache[piece] = word
        return self.cache[piece]

    def encode(self, text: str) -> list[int]:
        """All ids of `text`, no BOS/EOS, no truncation."""
        ids = []
        for piece in pieces(unicodedata.normalize("NFC", text).lower()):
            ids += [self.ids[piece]] if piece in SPECIAL else [self.ids[t] for t in self.bpe(piece)]
        return ids

    def row(self, text: str) -> list[int]:
        """The 77 ids SD1.5 feeds its text encoder: BOS, at most 75 ids, EOS, EOS padding."""
        bos, eos = self.ids[SPECIAL[0]], self.ids[SPECIAL[1]]
        ids = [bos] + self.encode(text)[:CONTEXT - 2] + [eos]
        return ids + [eos] * (CONTEXT - len(ids))
