"""BLIP's text tokenizer: bert-base-uncased WordPiece plus BLIP's two extra special tokens.

Salesforce/blip-image-captioning-large tokenizes with BERT's uncased WordPiece (30522 tokens) and
appends `[DEC]` (id 30522, the decoder's start token, config `bos_token_id`) and `[ENC]` (30523),
hence the decoder's vocab_size 30524. The pipeline is BERT's: clean control characters, split CJK
characters, lower-case and strip accents, split on whitespace and punctuation, then greedy
longest-match-first WordPiece with `##` continuation pieces and `[UNK]` for words over 100
characters or with no segmentation. Built with the `tokenizers` library from `vocab.txt` (or taken
whole from the hub's `tokenizer.json`).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from ..errors import UserError

BLIP_EXTRA_TOKENS = ("[DEC]", "[ENC]")  # BLIP's additions to BERT's vocabulary, ids 30522, 30523


class WordPieceTokenizer:
    """Text <-> ids without any special token added; the captioner adds [DEC] itself."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in ("[PAD]", "[SEP]", "[DEC]")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise UserError(f"the BLIP tokenizer lacks the special tokens {missing}; "
                            f"use the vocab.txt or tokenizer.json of Salesforce/blip-image-captioning-large")
        found = {t: i for t, i in ids.items() if i is not None}  # all three, as checked above
        self.pad_id, self.sep_id, self.bos_id = found["[PAD]"], found["[SEP]"], found["[DEC]"]

    @classmethod
    def from_vocab(cls, path: str | Path) -> "WordPieceTokenizer":
        """From a BERT `vocab.txt` (one token per line, id = line number)."""
        vocab: dict[str, int] = {}
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                vocab.setdefault(line.rstrip("\n"), i)
        # max_input_chars_per_word=100: BERT's limit, longer words become [UNK]
        tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # cleanup: see `decode`
        # BERT's own specials are whole tokens, never split; BLIP's two get the next free ids
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BLIP_EXTRA_TOKENS)])
        return cls(tok)

    @classmethod
    def from_dir(cls, folder: str | Path) -> "WordPieceTokenizer":
        """From a hub folder: `vocab.txt` if present, else `tokenizer.json`."""
        folder = Path(folder)
        if (folder / "vocab.txt").is_file():
            return cls.from_vocab(folder / "vocab.txt")
        if (folder / "tokenizer.json").is_file():
            return cls(Tokenizer.from_file(str(folder / "tokenizer.json")))
        raise UserError(f"no BLIP tokenizer in {folder}: expected vocab.txt or tokenizer.json "
                        f"(from Salesforce/blip-image-captioning-large)")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text without special tokens, with spaces before punctuation and clitics removed over the
        whole string (transformers' `clean_up_tokenization`, on by default when BLIP was released)."""
        text = self.tok.decode(ids, skip_special_tokens=True)
        for spaced, joined in _CLEANUP:
            text = text.replace(spaced, joined)
        return text


_CLEANUP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]
