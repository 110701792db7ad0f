"""CLIP's byte-level BPE tokenizer, as SD1.5 uses it (docs/design.md §3 "Tokenizer").

The BPE itself runs in the `tokenizers` library; this file only assembles CLIP's pipeline around it:

    text ─NFC, runs of whitespace → " ", lower-case─► CLIP's split regex ─► bytes → printable chars
         ─► BPE with "</w>" glued to the last char of every word ─► ids
    row  = [<|startoftext|>] + ids[:75] + [<|endoftext|>] + [pad] * n   (77 ids)

The padding token is <|endoftext|> in SD1.5 and "!" (id 0) in SD2.x, whose OpenCLIP tokenizer pads with
zeros: the folder's special_tokens_map.json says which (docs/sd2.md §2).

openai/CLIP also runs `ftfy.fix_text` and `html.unescape` before this; ftfy is not a dependency,
so (like transformers' CLIPTokenizer) we keep only the parts of its clean-up that need no ftfy:
NFC, whitespace clean-up and lower-casing.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import cast

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..errors import UserError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # ids 49406, 49407 in SD1.5's vocab.json
# openai/CLIP's pre-tokenisation pattern (clip/simple_tokenizer.py): the two special tokens,
# English contractions, runs of letters, single digits, runs of anything else but whitespace.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
VOCAB_SIZE = 49408  # CLIPTextConfig.vocab_size: 256 bytes + 256 "byte</w>" + 48894 merges + 2 specials


def byte_chars() -> list[str]:
    """The 256 printable characters that stand for the bytes 0..255 in CLIP's (= GPT-2's) byte-level
    BPE, in vocabulary order: bytes that are already printable keep their own character and come
    first; the other 68 (controls, space, soft hyphen...) get chr(256), chr(257)... and come after."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


class CLIPTokenizer:
    max_length = 77  # CLIP's context length (CLIPTextConfig.max_position_embeddings)

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS):
        self.vocab = vocab  # token string -> id, as in vocab.json
        self.merges = merges  # in priority order, as in merges.txt
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.pad_token, self.pad_id = pad_token, vocab[pad_token]  # SD1.5: EOS (49407); SD2.x: "!" (0)
        self.id_to_token = {i: t for t, i in vocab.items()}
        tok = Tokenizer(BPE(vocab, merges, end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        # keep what CLIP's regex matches, drop the rest (whitespace); then bytes -> chars. ByteLevel
        # also splits GPT-2's way, which changes nothing after CLIP's split except for a spelled-out
        # special token in upper case ("<|ENDOFTEXT|>" -> <| endoftext |>), as in transformers.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.add_special_tokens([BOS, EOS])  # a literal "<|endoftext|>" in a prompt is the EOS token
        self._tok = tok

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> "CLIPTokenizer":
        """SD1.5's `tokenizer/vocab.json` + `tokenizer/merges.txt` (there is no tokenizer.json)."""
        for path in (vocab_json, merges_txt):
            if not Path(path).is_file():
                raise UserError(f"tokenizer file {path} not found: point to the Stable Diffusion checkpoint's "
                                "`tokenizer/` folder (it holds vocab.json and merges.txt)")
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        if len(vocab) != VOCAB_SIZE or any(len(m) != 2 for m in merges) or BOS not in vocab or EOS not in vocab:
            raise UserError(f"{vocab_json} / {merges_txt} are not CLIP's BPE files ({len(vocab)} tokens, "
                            f"expected {VOCAB_SIZE} with {BOS} and {EOS}): use the `tokenizer/` folder of a Stable "
                            "Diffusion checkpoint (SD1.5's and SD2.x's are both CLIP's)")
        return cls(vocab, cast("list[tuple[str, str]]", merges))  # pairs: checked above

    @classmethod
    def from_dir(cls, path: str | Path, default_pad: str = EOS) -> "CLIPTokenizer":
        """A `tokenizer/` folder. The padding token is the one its special_tokens_map.json (or else its
        tokenizer_config.json) names, else `default_pad`. SD2.x's folders name "!" in special_tokens_map.json
        but "<|endoftext|>" in tokenizer_config.json; transformers lets the former win, and so do we."""
        tok = cls.from_files(Path(path) / "vocab.json", Path(path) / "merges.txt")
        pad = stated_pad_token(Path(path)) or default_pad
        if pad not in tok.vocab:
            raise UserError(f"{path}: padding token {pad!r} is not in vocab.json: the tokenizer files are broken; "
                            "download the folder again")
        return tok if pad == EOS else cls(tok.vocab, tok.merges, pad)

    @classmethod
    def from_bpe_gz(cls, path: str | Path) -> "CLIPTokenizer":
        """openai/CLIP's `bpe_simple_vocab_16e6.txt.gz` (also shipped by open-clip-torch). The vocabulary
        is derived the way openai/CLIP does it: the 256 byte chars, the same with "</w>", one token per
        merge (the first 48894 merges of the file), then BOS and EOS. The result equals SD1.5's files."""
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
        n_merges = VOCAB_SIZE - 2 * 256 - 2  # 48894; the file holds ~262k, CLIP uses the first ones
        merges = [(a, b) for a, b in (line.split(" ") for line in lines[1:1 + n_merges])]  # line 0 is a header
        chars = byte_chars()
        tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
        return cls({t: i for i, t in enumerate(tokens)}, merges)

    def save(self, path: str | Path) -> Path:
        """Write vocab.json + merges.txt in SD1.5's `tokenizer/` format: the vocabulary as JSON with
        sorted keys, 2-space indent and raw UTF-8; merges.txt opens with the "#version: 0.2" header
        line; neither file ends with a newline."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        vocab = json.dumps(self.vocab, indent=2, sort_keys=True, ensure_ascii=False)
        (path / "vocab.json").write_text(vocab, encoding="utf-8", newline="\n")
        merges = "\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in self.merges])
        (path / "merges.txt").write_text(merges, encoding="utf-8", newline="\n")
        return path

    # ---- text -> ids ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without BOS/EOS and without truncation."""
        return self._tok.encode(text).ids

    def tokens(self, text: str) -> list[str]:
        """BPE token strings of `text` as vocab.json spells them (e.g. "photograph</w>"; non-ASCII text
        shows as byte characters), for pictures and debugging."""
        return self._tok.encode(text).tokens

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """(B, 77) int64 rows as SD feeds its text encoder: BOS, at most 75 ids, EOS, padding (EOS in SD1.5,
        "!" in SD2.x)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        room = self.max_length - 2  # BOS and EOS always fit: longer prompts lose their tail
        rows = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)  # (B, 77)
        for row, enc in zip(rows, self._tok.encode_batch(texts)):
            ids = enc.ids[:room]
            row[: len(ids) + 2] = torch.tensor([self.bos_id] + ids + [self.eos_id])
        return rows

    def check_fits(self, text: str, what: str = "prompt") -> None:
        """Raise UserError naming `text` if Stable Diffusion would truncate it (more than 75 BPE tokens)."""
        n = len(self.encode(text))
        if n > self.max_length - 2:
            raise UserError(f"{what} {text!r} is {n} CLIP tokens long, but the text encoder reads at "
                            f"most {self.max_length - 2} (77 with BOS/EOS): shorten it")

    def word_positions(self, prompt: str, word: str) -> list[int]:
        """Positions in the 77-long row (BOS = 0) of the tokens of `word` (a word or a phrase such as
        "fire hydrant") inside `prompt`, e.g. ("a photograph of a cat", "cat") -> [5].

        Matching is on whole CLIP words, never substrings: the word's own tokens must appear in the
        prompt's tokens, starting right after a word end (a token ending in "</w>") or BOS, so "dog"
        is not found in "hotdog" (hot + dog</w>). Case and spacing follow the tokenizer's
        normalisation. If the word occurs several times, the LAST occurrence is returned: in a
        template continued by a caption ("a photograph of {c} ...") that is the caption's mention;
        callers who want the template's mention pass the template alone.
        """
        target = self.encode(word)
        if not target:
            raise UserError(f"class word {word!r} has no CLIP tokens: give a non-empty name")
        full = self.encode(prompt)
        fits = full[: self.max_length - 2]

        def starts(ids: list[int]) -> list[int]:
            n = len(target)
            return [i for i in range(len(ids) - n + 1) if ids[i:i + n] == target
                    and (i == 0 or self.id_to_token[ids[i - 1]].endswith("</w>"))]

        found = starts(fits)
        if not found and starts(full):
            raise UserError(f"word {word!r} occurs in the prompt {prompt!r} only after token 75, where "
                            "the text encoder's input is cut: shorten the prompt or move the word forward")
        if not found:
            raise UserError(f"word {word!r} does not occur in the prompt {prompt!r} (matched on whole CLIP "
                            "words, not substrings): put the class name itself in the prompt")
        first = found[-1] + 1  # +1: BOS sits at index 0 of the row
        return list(range(first, first + len(target)))


def stated_pad_token(folder: Path) -> str | None:
    """The padding token a tokenizer folder names: special_tokens_map.json first (transformers lets it
    override tokenizer_config.json), then tokenizer_config.json; None if neither names one."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
        except (ValueError, AttributeError):
            raise UserError(f"{path}: not valid JSON; download the tokenizer folder again") from None
        if isinstance(pad, dict):  # {"content": "!", "lstrip": false, ...}
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return None
