"""T5's SentencePiece tokenizer as SD3 uses it, read from the folder's `tokenizer_3/tokenizer.json`.

The `tokenizers` library runs the pipeline the file describes; for T5's files that is

    text ─Precompiled (SentencePiece's nmt_nfkc character map)─► split on whitespace
         ─► "▁" prepended to every word (Metaspace) ─► Unigram (the most probable segmentation) ─► ids
    row  = ids[:max_length - 1] + [</s>] + [<pad>] * n   (max_length ids, 256 in SD3)

as transformers' T5TokenizerFast does with padding="max_length", truncation=True (diffusers'
StableDiffusion3Pipeline._get_t5_prompt_embeds): there is no BOS, the EOS `</s>` (id 1) ends every row (the one
token a truncated prompt keeps at its end), and the rows are padded with `<pad>` (id 0). Neither sentencepiece nor
spiece.model is needed: tokenizer.json holds the vocabulary with its scores and the character map.

A word's pieces: every whitespace-separated word starts with a piece that begins with "▁" (U+2581, SentencePiece's
word boundary: "a photograph of a cat" -> ▁a ▁photograph ▁of ▁a ▁cat); a rare word continues with pieces without
it (▁sleep ing). `word_positions` finds a word through these boundaries (its docstring has the rule).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..errors import UserError

EOS, PAD = "</s>", "<pad>"  # ids 1 and 0 in T5's vocabulary (<unk> is 2)
BOUNDARY = "\u2581"  # "▁": SentencePiece's mark of a word start (Metaspace's replacement for the space)
MAX_LENGTH = 256  # SD3's default max_sequence_length (StableDiffusion3Pipeline.__call__)
MODEL_MAX_LENGTH = 512  # SD3's limit ("max_sequence_length cannot be greater than 512"); T5's tokenizer_config.json
UNSET_MAX_LENGTH = 10**6  # transformers writes int(1e30) as model_max_length when a tokenizer has none


class T5Tokenizer:
    """Prompt -> (B, max_length) int64 ids for SD3's T5 encoder; `max_length` is settable (at most
    `model_max_length`)."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = MAX_LENGTH, model_max_length: int = MODEL_MAX_LENGTH,
                 source: str = "tokenizer.json"):
        eos, pad = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)
        if eos is None or pad is None:
            raise UserError(f"{source}: no {EOS} or {PAD} token: not T5's tokenizer; download the tokenizer_3 "
                            "folder of the SD3 checkpoint again")
        tokenizer.no_truncation()  # the row is cut and padded here, whatever the file asks for
        tokenizer.no_padding()
        self._tok = tokenizer
        self.eos_id, self.pad_id = eos, pad  # 1, 0
        self.model_max_length = model_max_length
        self.max_length = max_length

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = MAX_LENGTH,
                  model_max_length: int = MODEL_MAX_LENGTH) -> "T5Tokenizer":
        """A T5 `tokenizer.json` (a Unigram model: T5's SentencePiece vocabulary converted by transformers)."""
        path = Path(path)
        again = "download the SD3 checkpoint's tokenizer_3 folder again"
        if not path.is_file():
            raise UserError(f"tokenizer file {path} not found: point to the SD3 checkpoint's tokenizer_3/ folder "
                            f"(it holds tokenizer.json); {again}")
        try:
            model_type = json.loads(path.read_text(encoding="utf-8"))["model"]["type"]
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # JSON's ValueError, a missing key, or the tokenizers library's own (plain) Exception
            raise UserError(f"{path}: not a readable tokenizer.json ({type(e).__name__}: {str(e)[:80]}); {again}") from None
        if model_type != "Unigram":
            raise UserError(f"{path}: a {model_type} tokenizer, not T5's SentencePiece (Unigram) one; {again}")
        return cls(tok, max_length, model_max_length, source=str(path))

    @classmethod
    def from_dir(cls, folder: str | Path, max_length: int = MAX_LENGTH) -> "T5Tokenizer":
        """A `tokenizer_3/` folder: tokenizer.json, and the limit `model_max_length` of its tokenizer_config.json
        if it states one (T5's: 512), else 512."""
        folder = Path(folder)
        limit = MODEL_MAX_LENGTH
        config = folder / "tokenizer_config.json"
        if config.is_file():
            try:
                stated = json.loads(config.read_text(encoding="utf-8")).get("model_max_length")
            except (ValueError, AttributeError, UnicodeDecodeError):
                raise UserError(f"{config}: not valid JSON; download the SD3 checkpoint's tokenizer_3 folder again") from None
            if isinstance(stated, (int, float)) and 0 < stated < UNSET_MAX_LENGTH:
                limit = int(stated)
        return cls.from_file(folder / "tokenizer.json", max_length, limit)

    # ---- text -> ids ----------------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        return self._max_length

    @max_length.setter
    def max_length(self, n: int) -> None:
        if not 2 <= n <= self.model_max_length:
            raise UserError(f"T5 max_length {n}: must be between 2 and {self.model_max_length} (the tokenizer's "
                            "model_max_length; SD3's default is 256)")
        self._max_length = n

    def encode(self, text: str) -> list[int]:
        """The pieces' ids of `text`, without EOS and without truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokens(self, text: str) -> list[str]:
        """The pieces of `text` as the vocabulary spells them ("▁cat"; an unknown character as itself)."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """(B, max_length) int64 rows: at most max_length - 1 ids, EOS, padding."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)  # (B, L)
        for row, enc in zip(rows, self._tok.encode_batch(texts, add_special_tokens=False)):
            ids = enc.ids[: self.max_length - 1] + [self.eos_id]
            row[: len(ids)] = torch.tensor(ids)
        return rows

    def word_positions(self, prompt: str, word: str) -> list[int]:
        """Positions in the row (the first piece is 0: T5 has no BOS) of the pieces that spell `word` (a word or a
        phrase such as "fire hydrant") inside `prompt`, e.g. ("a photograph of a cat", "cat") -> [4].

        The rule, on the pieces' text (normalised as the tokenizer normalises, "▁" for each word start): the word's
        own pieces joined ("▁cat"; "▁fire▁hydrant") must occur in the prompt's joined pieces ("▁a▁photograph▁of▁a
        ▁cat") starting at a word start (the match begins with "▁") and ending at a word end (followed by "▁",
        by the end, or by a character that is not a letter or digit: "cat." and "cat's" contain the word "cat",
        "cats" and "catfish" do not). The positions are those of every piece that overlaps the match, so a word
        segmented differently in context (▁ca t. instead of ▁cat .) is still found. Case-sensitive, as T5's
        vocabulary is. If the word occurs several times the LAST occurrence is returned (as CLIPTokenizer's
        word_positions: in a template continued by a caption, the caption's mention).
        """
        target = "".join(self.tokens(word))
        if not target.strip(BOUNDARY):
            raise UserError(f"class word {word!r} has no T5 tokens: give a non-empty name")
        pieces = self.tokens(prompt)
        text = "".join(pieces)
        starts = [0]
        for piece in pieces:
            starts.append(starts[-1] + len(piece))  # piece i spans text[starts[i]:starts[i + 1]]

        def word_end(at: int) -> bool:
            return at == len(text) or text[at] == BOUNDARY or not text[at].isalnum()

        def covered(first: int) -> list[int]:  # the pieces overlapping the match that starts at text[first]
            end = first + len(target)
            return [i for i in range(len(pieces)) if starts[i] < end and starts[i + 1] > first]

        found = [covered(i) for i in range(len(text)) if text.startswith(target, i) and word_end(i + len(target))]
        fits = [positions for positions in found if positions[-1] < self.max_length - 1]  # the last id before EOS
        if not found:
            raise UserError(f"word {word!r} does not occur in the prompt {prompt!r} (matched on whole T5 words, "
                            "case-sensitive): put the class name itself in the prompt")
        if not fits:
            raise UserError(f"word {word!r} occurs in the prompt {prompt!r} only after T5 token {self.max_length - 1}, "
                            "where the text encoder's input is cut: shorten the prompt or move the word forward")
        return fits[-1]
