"""Test helpers for SD3's T5 encoder and tokenizer (minidiffseg/sd3/t5.py, t5_tokenizer.py): random tiny T5 encoders
written by transformers itself, and a T5-format tokenizer.json written offline.

- `reference_encoder(cfg, seed)`: a transformers T5EncoderModel at one of our configs, every parameter randomised;
  `write_text_encoder_3(dir, ...)` saves one with `save_pretrained`, as a diffusers SD3 folder's text_encoder_3/.
- `write_tokenizer_3(dir)`: a tokenizer_3/ folder (tokenizer.json, tokenizer_config.json,
  special_tokens_map.json) in the layout of T5's files on the hub: a Unigram model whose vocabulary starts with
  <pad>, </s>, <unk> (ids 0, 1, 2) and ends with the 100 sentinels <extra_id_99> ... <extra_id_0>, a `Precompiled`
  normaliser (SentencePiece's compiled character map), WhitespaceSplit + Metaspace("▁", prepended to every word),
  and a TemplateProcessing post-processor appending </s>. No T5 tokenizer file ships in any package installed here
  (site-packages searched for spiece.model and T5 tokenizer.json files), so the vocabulary is a small hand-made
  one (`VOCAB`) and the character map a small compiled one (`CHARSMAP`); the pipeline and the file format are
  T5's. `legacy=True` writes the older JSON spelling of Metaspace (`"add_prefix_space": true`) that the hub's T5
  files, converted in 2020, carry.

Import from a test as `from tiny_t5 import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch

from assets import require
from minidiffseg.sd3.t5 import T5Config

transformers = require("transformers")  # the reference T5EncoderModel and T5TokenizerFast (test-only)
tokenizers = require("tokenizers")

TINY = T5Config.tiny()  # hf-internal-testing/tiny-random-t5's sizes: ReLU, 8 buckets
# T5 v1.1's gated-GELU feed-forward at tiny widths, with XXL's 32 buckets and distance 128 (rows of 256 reach the
# logarithmic buckets and the last one)
TINY_GATED = replace(TINY, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)

# SentencePiece's compiled character map (the `precompiled_charsmap` of a .model's normalizer_spec, which
# transformers copies into tokenizer.json's `Precompiled` normaliser) for 9 of NFKC's rules: no-break space and
# ideographic space -> space, the ligature ﬁ -> fi, fullwidth Ａ/ａ -> A/a, ① -> 1, … -> ..., ½ -> 1⁄2, and e + combining
# acute -> é. Compiled by sentencepiece 0.2.2 (`SentencePieceTrainer.train(normalization_rule_tsv=...)`, those rules
# as its TSV of code points); T5's own map is nmt_nfkc's, 240 kB.
CHARSMAP = (
    "AAQAAACQAQBlPAMAzAACAIEdAAAVAACAoA0AAAAAAIAIAACAgJwCAKYNAAACAACAoB0AAAYAAICADAIAgCEAAKx4AgCBBQAAEgAAgKEFAAAOAA"
    "CAgQUAABAAAIAXAAAAFgAAAL19AACRyAIAGwAAABoAAAAdAAAAHAAAAL0sAgC8sAIAIQAAACAAAAAjAAAAIgAAACUAAAAkAAAAJwAAACYAAAAp"
    "AAAAKAAAACsAAAAqAAAALQAAACwAAAAvAAAALgAAADEAAAAwAAAAMwAAADIAAAA1AAAANAAAADcAAAA2AAAAOQAAADgAAAA7AAAAOgAAAD0AAA"
    "A8AAAAPwAAAD4AAABBAAAAQAAAAEMAAABCAAAARQAAAEQAAABHAAAARgAAAEkAAABIAAAASwAAAEoAAABNAAAATAAAAE8AAABOAAAAUQAAAFAA"
    "AABTAAAAUgAAAFUAAABUAAAAVwAAAFYAAABZAAAAWAAAAFsAAABaAAAAXQAAAFwAAABfAAAAXgAAAGEAAABgAAAAYwAAAGIAAABlAAAAZAAAAG"
    "cAAABmAAAAaQAAAGgAAABrAAAAagAAAG0AAABsAAAAbwAAAG4AAABxAAAAcAAAAHMAAAByAAAAdQAAAHQAAAB3AAAAdgAAAHkAAAB4AAAAewAA"
    "AHoAAAB9AAAAfAAAAH8AAAB+AAAAgQAAAIAAAACDAAAAggAAAIUAAACEAAAA4jgAAOMoAACJAAAAiAAAAIsAAADvoAAAjQAAAIwAAACPAAAAjg"
    "AAAJEAAACQAAAAkwAAAJIAAACVAAAAlAAAAJcAAACWAAAAmQAAAJgAAACbAAAAmgAAAJ0AAACcAAAAnwAAAJ4AAAChAAAAoAAAAKMAAACiAAAA"
    "pQAAAKQAAADCDAAApgAAAKkAAACoAAAAqwAAAKoAAACtAAAArAAAAK8AAACuAAAAsQAAALAAAACzAAAAsgAAALUAAAC0AAAAtwAAALYAAAC5AA"
    "AAuAAAALsAAAC6AAAAvQAAALwAAAC/AAAAvgAAAMEAAADAAAAAwwAAAMIAAADFAAAAxAAAAMcAAADGAAAAyQAAAMgAAADLAAAAygAAAM0AAADM"
    "AAAAzwAAAM4AAADRAAAA0AAAANMAAADSAAAA1QAAANQAAADXAAAA1gAAANkAAADYAAAA2wAAANoAAADdAAAA3AAAAN8AAADeAAAA4QAAAOAAAA"
    "DjAAAA4gAAAOUAAADkAAAA5wAAAOYAAADpAAAA6AAAAOsAAADqAAAA7QAAAOwAAADvAAAA7gAAAPEAAADwAAAA8wAAAPIAAAD1AAAA9AAAAPcA"
    "AAD2AAAA+QAAAPgAAAD7AAAA+gAAAP0AAAD8AAAA/wAAAP4AAAAgAC4uLgAxADHigYQyAEEAYQBmaQDDqQA="
)
SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, as in T5's spiece.model
EXTRA_IDS = 100  # the sentinels <extra_id_0..99>, appended in reverse order (transformers' T5Converter)
# whole words (each "▁word"): those of the tests' prompts and VOC's class names, but not "sleeping" (▁sleep ing)
WORDS = ("a an the of on in with and photograph photography cat dog sleep sofa fire hydrant potted plant person "
         "bird boat bottle bus car chair cow table horse motorbike sheep train monitor tv aeroplane bicycle "
         "dining street at night red blue small large café très über Straße").split()
SUFFIXES = ("ing", "s", "ed", "er", "ly", "'s", "tion", "ph", "oto", "gra")
CHARS = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-/⁄" "éèüöäßçñ" "日本語猫犬の写真")


def vocab() -> list[tuple[str, float]]:
    """The tiny Unigram vocabulary with log-probability scores, in T5's id layout (specials first, then "▁", the
    pieces, the sentinels last). Whole-word pieces score above their spellings, so Viterbi prefers them."""
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in SPECIALS] + [("\u2581", -2.0)]
    pieces += [("\u2581" + w, -6.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    pieces += [(s, -7.0 - 0.01 * i) for i, s in enumerate(SUFFIXES)]
    pieces += [("\u2581" + c, -9.0) for c in CHARS if c.isalpha()]  # a word starting with a letter
    pieces += [(c, -10.0) for c in CHARS]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(EXTRA_IDS))]
    return pieces


def t5_tokenizer_object():
    """A tokenizers.Tokenizer assembled as T5's tokenizer.json describes it (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram(vocab(), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Precompiled(base64.b64decode(CHARSMAP))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.add_special_tokens(SPECIALS + [f"<extra_id_{i}>" for i in range(EXTRA_IDS)])
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    return tok


def write_tokenizer_3(dir: str | Path, legacy: bool = False, model_max_length: int | None = 512) -> Path:
    """A tokenizer_3/ folder; `legacy` writes Metaspace as the hub's 2020 T5 files spell it."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    spec = json.loads(t5_tokenizer_object().to_str())
    if legacy:
        old = {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}
        spec["pre_tokenizer"]["pretokenizers"][1] = old
        spec["decoder"] = old
    (dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "extra_ids": EXTRA_IDS, "additional_special_tokens": extra, "legacy": True}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}
    (dir / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    return dir


def reference_config(cfg: T5Config):
    """transformers' T5Config at our `cfg`."""
    fields = {k: v for k, v in asdict(cfg).items() if k != "keep_wo_float32"}
    return transformers.T5Config(**fields)


def randomise_t5_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter: the RMS norms' scales near 1, the embedding and the relative-attention table
    N(0, 1), projections with variance 1/fan_in (unit-variance outputs for unit-variance inputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:  # T5LayerNorm.weight
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("shared.weight", "relative_attention_bias.weight")):
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return model.eval()


def reference_encoder(cfg: T5Config, seed: int = 0):
    """A transformers T5EncoderModel at `cfg` with every parameter randomised (float32)."""
    return randomise_t5_(transformers.T5EncoderModel(reference_config(cfg)), seed)


def write_text_encoder_3(dir: str | Path, cfg: T5Config = TINY, seed: int = 0,
                         dtype: torch.dtype = torch.float32):
    """A text_encoder_3/ folder (config.json + model.safetensors) by transformers' save_pretrained; returns the
    (float32) reference it saved."""
    ref = reference_encoder(cfg, seed)
    ref.to(dtype).save_pretrained(Path(dir))
    return ref.float()


def prompt_ids(batch: int = 3, length: int = 256, vocab_size: int = 1103, seed: int = 1) -> torch.Tensor:
    """(B, L) rows as SD3's tokenizer makes them: random piece ids (3 ... vocab_size-1), EOS (1), padding (0);
    the last row fills the whole length (a truncated prompt)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n = length - 1 if b == batch - 1 else 5 + 17 * b
        ids[b, :n] = torch.randint(3, vocab_size, (n,), generator=g)
        ids[b, n] = 1
    return ids
