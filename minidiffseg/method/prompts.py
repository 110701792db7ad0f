"""Prompts for the class maps (docs/design.md §5): template, optional caption continuation, class-token
re-weighting ("++") and the choice of the token columns whose cross-attention becomes a class map.

Everything works on whitespace-separated *chunks*: CLIP's pre-tokeniser never joins text across
whitespace, so the tokens of a prompt are the tokens of its chunks, one after the other, and a
word's positions in the 77-long row follow from the chunks before it (BOS sits at position 0).

Weight marks (the prompt-to-prompt / compel convention): a word written `word+` is weighted 1.1,
`word++` 1.21, `word-` 0.9, `word--` 0.81 (each mark multiplies by 1.1 or 0.9). Marks are removed
from the text and add no token. The official recipe puts "++" on the class's last word: weight
1.21 on its tokens, applied to the text-encoder output as z' = z∅ + w·(z − z∅), z∅ the encoding
of the empty prompt (see `reweight`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..sd.tokenizer import CLIPTokenizer
from .recipe import CLASS_WEIGHT, TEMPLATES  # noqa: F401  (TEMPLATES: re-exported for the CLI)

_MARK = re.compile(r"^(.*[^+-])(\++|-+)$")


def parse_marks(chunk: str) -> tuple[str, float]:
    """'cat++' -> ('cat', 1.21); 'cat' -> ('cat', 1.0)."""
    m = _MARK.match(chunk)
    if not m:
        return chunk, 1.0
    marks = m.group(2)
    return m.group(1), (1.1 if marks[0] == "+" else 0.9) ** len(marks)


def _word(chunk: str) -> str:
    """The word part of a chunk, for matching class names: lower-case, trailing punctuation dropped."""
    return re.sub(r"[^\w]+$", "", chunk.lower())


@dataclass
class ClassPrompt:
    """One prompt row: the text the tokenizer sees, per-position weights and class-map columns."""

    text: str
    weights: torch.Tensor  # (77,) re-weighting of the text-encoder output, 1 = unchanged
    select: torch.Tensor  # (77, K) token columns averaged into each of the K class maps
    names: tuple[str, ...] = ()  # the K class names as `text` spells them (T5's columns are found from them)


def build_prompt(tok: CLIPTokenizer, text: str, spans: list[tuple[int, int]], *, class_weight: float = CLASS_WEIGHT,
                 tokens: str = "last", ing_token: bool = True) -> ClassPrompt:
    """Prompt `text` (weight marks allowed) whose chunks spans[k] = [first, end) name class k.

    tokens: "last" (the class name's last BPE token, as the official code) or "all" (every token of
    the name). ing_token: if the word right after the class ends in "ing", its first token is averaged in.
    """
    if tokens not in ("last", "all"):
        raise UserError(f"token selection {tokens!r} is unknown: use 'last' or 'all'")
    chunks = text.split()
    parsed = [parse_marks(c) for c in chunks]
    clean = " ".join(c for c, _ in parsed)
    tok.check_fits(clean, "prompt")
    ids = [tok.encode(c) for c, _ in parsed]
    starts = [1]  # position of each chunk's first token; BOS is position 0
    for chunk_ids in ids:
        starts.append(starts[-1] + len(chunk_ids))
    n = tok.max_length
    weights = torch.ones(n)
    for i, (_, w) in enumerate(parsed):
        weights[starts[i]:starts[i + 1]] = w
    select = torch.zeros(n, len(spans))
    for k, (first, end) in enumerate(spans):
        # positions of each class word's own tokens (a chunk may carry trailing punctuation: "cat,")
        words = [list(range(starts[i], starts[i] + len(tok.encode(_word(parsed[i][0]) or parsed[i][0]))))
                 for i in range(first, end)]
        last_word = words[-1]
        if parsed[end - 1][1] == 1.0:  # an explicit mark on the class word wins over the default "++"
            weights[last_word] = class_weight
        cols = [last_word[-1]] if tokens == "last" else [p for w in words for p in w]
        if ing_token and end < len(chunks) and _word(parsed[end][0]).endswith("ing"):
            cols.append(starts[end])
        select[cols, k] = 1.0 / len(cols)
    names = tuple(" ".join(re.sub(r"[^\w]+$", "", parsed[i][0]) for i in range(first, end)) for first, end in spans)
    return ClassPrompt(clean, weights, select, names)


def t5_columns(tok, row: ClassPrompt, *, tokens: str = "last", class_weight: float = CLASS_WEIGHT
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's T5 tokens of a row's classes (minidiffseg.sd3.t5_tokenizer `word_positions`: whole T5 words): the
    weights (L,) with "++" on each class's last word, and the columns (L, K) of each class map, its name's last
    piece ("last") or every piece of it ("all"), as `build_prompt` chooses CLIP's."""
    n = tok.max_length
    weights, select = torch.ones(n), torch.zeros(n, len(row.names))
    for k, name in enumerate(row.names):
        weights[tok.word_positions(row.text, name.split()[-1])] = class_weight
        pieces = tok.word_positions(row.text, name)
        cols = pieces[-1:] if tokens == "last" else pieces
        select[cols, k] = 1.0 / len(cols)
    return weights, select


def template_prompt(tok: CLIPTokenizer, name: str, template: str = TEMPLATES["photograph"],
                    caption: str | None = None, **kw) -> ClassPrompt:
    """'a photograph of {}' filled with `name`, optionally continued by a caption (the BLIP
    conditional caption; given whole, i.e. starting with the template text, or as the continuation)."""
    name = _check_name(name)
    before = template.split("{}")[0]
    if "{}" not in template or (before and not before[-1].isspace()):
        raise UserError(f"template {template!r} must contain '{{}}' at the start of a word, e.g. 'a photo of {{}}'")
    text = template.format(name)
    if caption:
        caption = " ".join(caption.split())
        text = caption if caption.lower().startswith(text.lower()) else f"{text} {caption}"
    first = len(before.split())
    return build_prompt(tok, text, [(first, first + len(name.split()))], **kw)


def user_prompt(tok: CLIPTokenizer, name: str, text: str, **kw) -> ClassPrompt:
    """A prompt written by the user for class `name`: the class words are located (first occurrence,
    whole words, weight marks and trailing punctuation ignored) and re-weighted like the template's."""
    name = _check_name(name)
    target = [_word(w) for w in name.split()]
    words = [_word(parse_marks(c)[0]) for c in text.split()]
    for i in range(len(words) - len(target) + 1):
        if words[i:i + len(target)] == target:
            return build_prompt(tok, text, [(i, i + len(target))], **kw)
    raise UserError(f"prompt {text!r} does not contain the class name {name!r} as whole words: "
                    "include it so its attention can be read")


def joint_prompt(tok: CLIPTokenizer, names: list[str], template: str = TEMPLATES["photograph"], **kw) -> ClassPrompt:
    """One prompt naming every class ('a photograph of cat and dog and sofa'): K = C maps from one row."""
    names = [_check_name(n) for n in names]
    joined = " and ".join(names)
    before = template.split("{}")[0]
    spans, at = [], len(before.split())
    for name in names:
        spans.append((at, at + len(name.split())))
        at += len(name.split()) + 1  # + "and"
    return build_prompt(tok, template.format(joined), spans, **kw)


def _check_name(name: str) -> str:
    clean = " ".join(str(name).split())
    if not clean:
        raise UserError(f"class name {name!r} is empty or whitespace: give each class a name")
    if not any(ch.isalnum() for ch in clean):
        raise UserError(f"class name {name!r} has no letters or digits: give a word")
    return clean


def check_classes(classes: list[str]) -> list[str]:
    """Clean a class list: non-empty, names non-empty, no duplicates (case-insensitive)."""
    if isinstance(classes, str):
        classes = [c for c in classes.split(",")]
    if not classes:
        raise UserError("the class list is empty: give at least one class name (e.g. --classes cat,dog)")
    names = [_check_name(c) for c in classes]
    seen: dict[str, str] = {}
    for n in names:
        if n.lower() in seen:
            raise UserError(f"class {n!r} is listed twice: give each class once")
        seen[n.lower()] = n
    return names


def reweight(z: torch.Tensor, z_empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z' = z∅ + w·(z − z∅): z (B, 77, D), z_empty (1, 77, D), weights (B, 77)."""
    return z_empty + weights[..., None].to(z.dtype) * (z - z_empty)
