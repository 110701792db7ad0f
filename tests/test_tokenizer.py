"""CLIPTokenizer on SD1.5's real vocabulary (docs/design.md §3, §7.2), against two references on ~600 strings:

- tests/reference_bpe.py, an independent plain-Python byte-pair encoder over openai/CLIP's real merges
  file (its own byte map, cleaning, pre-tokenisation and merge loop; nothing shared with our code or
  the `tokenizers` library): all ids and whole padded 77-id rows;
- transformers' CLIPTokenizer reading the vocab.json + merges.txt we write in SD1.5's format: rows.
"""

import json
import random
import re

import pytest
import torch
from assets import clip_bpe_path, official_labels_dir, require, write_sd15_tokenizer
from class_lists import ALL_CLASSES, COCO, PROMPT_RENAMES, VOC
from reference_bpe import ReferenceBPE

from minidiffseg.errors import UserError
from minidiffseg.sd.tokenizer import CLIPTokenizer

CLASSES = ALL_CLASSES  # every evaluation name of VOC, Context and COCO-Object (tests/class_lists.py)
# the official candidate names (prompt words) that differ from an evaluation name, and its "toothbrus" typo
PROMPT_NAMES = sorted({n for renames in PROMPT_RENAMES.values() for n in renames.values()} - set(CLASSES)) + ["toothbrus"]

LONG = [
    "a " * 100,
    " ".join(COCO),
    "a photograph of a cat sitting on a red sofa next to a window, " * 6,
    "emoji 🐱🐶🦊 " * 30,
    "1234567890" * 10,
]
STRINGS = {
    "punctuation": ["hello, world!", "what?!?", "wait... what", "a.b.c", "(parens) [brackets] {braces}",
                    "e-mail: someone@example.com", "C++ / C# / F#", "50% off!!!", "#hashtag @mention",
                    'quotes "double" and \'single\'', "back\\slash", "~`^*_=+|<>", "smile :-) ;) :D",
                    "--- *** ___", "a/b\\c|d", "“curly” ‘quotes’ — dash – en…", "¿qué? ¡sí!", "<html>&amp;"],
    "unicode": ["café", "naïve résumé", "Straße", "Ångström", "ÉCOLE ÉTÉ", "cafe\u0301 (decomposed)",
                "日本語のテキスト", "中文分词测试", "한국어 문장", "Привет, мир", "Ελληνικά", "עברית",
                "العربية", "हिन्दी", "ไทย", "🐱🐶", "👍🏽 thumbs", "👨‍👩‍👧 family", "❤️ heart",
                "flag 🇫🇷", "ﬁ ligature", "ＦＵＬＬ ｗｉｄｔｈ", "zero\u200bwidth", "İstanbul", "ǅ dz",
                "ΣΊΣΥΦΟΣ", "ß ẞ", "x\u0300\u0301\u0302y"],
    "numbers": ["1234567890", "3.14159", "1,000,000", "2nd 3rd 4th 21st", "½ ² ③ ⅷ", "٣ ٤ ٥",
                "1e-5 0x1F", "2024-01-31 12:30", "-42 +7", "v1.5", "$9.99 €5 £3 ¥100"],
    "contractions": ["don't", "it's", "we're", "I've", "I'm", "you'll", "he'd", "DON'T STOP", "It'S",
                     "it’s curly", "rock'n'roll", "'s alone", "the dog's bone", "o'clock", "'''", "''s",
                     "ain't y'all'd've"],
    "whitespace": ["  leading", "trailing  ", "multiple   spaces", "\t\ttabs\t", "\n\nnew\nlines\r\n",
                   "", " ", "\u00a0non\u00a0breaking\u00a0", "em\u2003space", "ideographic\u3000space",
                   "line\u2028separator", "form\x0cfeed\x0bvtab", "a\u0085next-line"],
    "special tokens": ["a <|endoftext|> b", "<|startoftext|>", "<|startoftext|>a cat<|endoftext|>",
                       "<|endoftext|><|endoftext|>", "<|ENDOFTEXT|>", "<|endoftext"],
    "long": LONG,
    "class names": CLASSES + PROMPT_NAMES + [c.upper() for c in VOC] + ["dining table", "potted plant", "tv monitor"],
    "templates": [t.format(c) for c in CLASSES + PROMPT_NAMES for t in ("a photograph of {}", "a photography of {}")],
}


def fuzz_strings(n: int = 150, seed: int = 0) -> list[str]:
    """Seeded random strings mixing the character classes the pipeline treats differently."""
    alphabet = ("abcXYZ0189 '’'.,!?-_#@&" "\t\n\r\u00a0\u2003\u3000" "éÉüßøØ" "e\u0301\u0308"
                "日本語中文한국" "абвЖ" "αβΣ" "हि" "🐱👍🏽\u200d❤️🇫🇷")
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


STRINGS["fuzz"] = fuzz_strings()


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return write_sd15_tokenizer(tmp_path_factory.mktemp("sd15") / "tokenizer")


@pytest.fixture(scope="module")
def tok(sd15_dir):
    return CLIPTokenizer.from_dir(sd15_dir)


@pytest.fixture(scope="module")
def ref(sd15_dir):
    transformers = require("transformers")  # the reference tokenizer
    return transformers.CLIPTokenizer.from_pretrained(sd15_dir)


@pytest.fixture(scope="module")
def plain():
    return ReferenceBPE(clip_bpe_path())


def tokenizers_spelling(text: str) -> str:
    """`text` rewritten where the `tokenizers` pipeline (ours, and transformers' CLIPTokenizer) knowingly
    departs from openai/CLIP's Python tokenizer, so that the plain reference sees what we do:
    - lower-casing is per character, so a word-final capital sigma becomes σ; Python's str.lower, which
      openai/CLIP uses, gives the final form ς;
    - a special token spelled in another case ("<|ENDOFTEXT|>") is no special token: the byte-level
      pre-tokeniser breaks it at the bars into "<|", "endoftext", "|>"; openai/CLIP lower-cases it
      first and emits the special id."""
    text = text.replace("Σ", "σ")
    return re.sub(r"<\|(startoftext|endoftext)\|>", lambda m: m[0] if m[0] == m[0].lower() else f"<| {m[1]} |>",
                  text, flags=re.IGNORECASE)


def assert_same_as_plain(tok, plain, texts: list[str]):
    """All ids (no truncation) and the 77-id rows equal the plain-Python reference's."""
    for text in texts:
        ours, want = tok.encode(text), plain.encode(tokenizers_spelling(text))
        assert ours == want, f"{text!r}: ids differ from the plain-Python BPE\n  ours {tok.tokens(text)}\n" \
                             f"  ours {ours}\n  ref  {want}"
    rows, want = tok(texts), torch.tensor([plain.row(tokenizers_spelling(t)) for t in texts])
    bad = (rows != want).any(dim=1).nonzero().flatten().tolist()
    assert not bad, f"{len(bad)} rows differ; first {texts[bad[0]]!r}:\n  ours {rows[bad[0]].tolist()}\n" \
                    f"  ref  {want[bad[0]].tolist()}"


@pytest.mark.parametrize("group", list(STRINGS))
def test_ids_equal_the_plain_python_bpe(tok, plain, group):
    assert_same_as_plain(tok, plain, STRINGS[group])


def test_the_known_departures_from_openai_clip_are_real(tok, plain):
    """tokenizers_spelling changes the reference's answer exactly where it says (so it hides nothing else)."""
    for text in ["ΣΊΣΥΦΟΣ", "<|ENDOFTEXT|>", "a <|EndOfText|> b"]:
        assert plain.encode(text) != plain.encode(tokenizers_spelling(text)) == tok.encode(text), text
    for text in STRINGS["class names"] + STRINGS["punctuation"] + ["<|endoftext|>", "σας"]:
        assert tokenizers_spelling(text) == text


def reference_rows(ref, texts: list[str]) -> torch.Tensor:
    """What diffusers' StableDiffusionPipeline feeds SD1.5's text encoder."""
    return ref(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def assert_same_rows(tok, ref, texts: list[str]):
    ours, theirs = tok(texts), reference_rows(ref, texts)
    assert ours.shape == theirs.shape == (len(texts), 77) and ours.dtype == torch.long
    bad = (ours != theirs).any(dim=1).nonzero().flatten().tolist()
    assert not bad, (f"{len(bad)}/{len(texts)} rows differ from transformers; first: {texts[bad[0]]!r}\n"
                     f"  ours {ours[bad[0]].tolist()}\n  ref  {theirs[bad[0]].tolist()}")


@pytest.mark.parametrize("group", list(STRINGS))
def test_rows_equal_transformers(tok, ref, group):
    assert_same_rows(tok, ref, STRINGS[group])


def test_official_candidate_files(tok, ref, plain):
    """The names in the official candidate files, when ../shared has them (the same names are in STRINGS,
    from tests/class_lists.py, for the default run)."""
    names = set()
    for path in sorted(official_labels_dir().glob("*.json")):
        for image_to_classes in json.loads(path.read_text()).values():
            for classes in image_to_classes.values():
                names.update(classes)
    names = sorted(names)
    assert len(names) > 100, f"expected the VOC/Context/COCO candidate names, got {names}"
    assert set(names) <= set(STRINGS["class names"]), sorted(set(names) - set(STRINGS["class names"]))
    texts = names + [t.format(c) for c in names for t in ("a photograph of {}", "a photography of {}")]
    assert_same_rows(tok, ref, texts)
    assert_same_as_plain(tok, plain, texts)


@pytest.mark.parametrize("text", LONG)
def test_truncation_keeps_eos_last(tok, text):
    ids = tok.encode(text)
    assert len(ids) > 75, f"test prompt too short to be truncated: {len(ids)} tokens"
    row = tok([text])[0].tolist()
    assert row == [tok.bos_id] + ids[:75] + [tok.eos_id]
    with pytest.raises(UserError, match="class prompt"):
        tok.check_fits(text, "class prompt")


def test_short_rows_padded_with_eos(tok):
    row = tok(["a photograph of a cat"])[0].tolist()
    assert row == [49406, 320, 8853, 539, 320, 2368] + [49407] * 71  # ids of SD1.5's vocab.json
    assert (tok.bos_id, tok.eos_id, tok.max_length) == (49406, 49407, 77)
    tok.check_fits("a photography of " + " ".join(["cat"] * 72), "class prompt")  # exactly 75 tokens


def test_files_in_sd15_format(sd15_dir, tmp_path):
    merges = (sd15_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894 and merges[1] == "i n"
    vocab_text = (sd15_dir / "vocab.json").read_text(encoding="utf-8")
    assert vocab_text.startswith('{\n  "!": 0,\n  "!!": 1443,\n') and vocab_text.endswith('"Ń</w>": 511\n}')
    vocab = json.loads(vocab_text)
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert sorted(vocab.values()) == list(range(49408))
    # reading the files back and saving again reproduces them byte for byte
    CLIPTokenizer.from_dir(sd15_dir).save(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (sd15_dir / name).read_bytes(), name


def test_from_bpe_gz_equals_from_files(tok):
    gz = CLIPTokenizer.from_bpe_gz(clip_bpe_path())
    assert gz.vocab == tok.vocab and gz.merges == tok.merges
    texts = [t for group in STRINGS.values() for t in group]
    assert torch.equal(gz(texts), tok(texts))


@pytest.mark.parametrize("name", ["fire hydrant", "tvmonitor", "teddy bear", "potted plant", "pottedplant",
                                  "cat", "hair drier"])
def test_word_positions_multi_token(tok, ref, name):
    prompt = f"a photography of {name} standing next to a tree"
    pos = tok.word_positions(prompt, name)
    assert pos == list(range(4, 4 + len(tok.encode(name)))), pos  # BOS a photography of -> index 4
    row = tok([prompt])[0]
    assert [tok.id_to_token[i] for i in row[pos].tolist()] == tok.tokens(name)
    assert ref.convert_ids_to_tokens(reference_rows(ref, [prompt])[0, pos].tolist()) == tok.tokens(name)


def test_word_positions_rules(tok):
    assert tok.word_positions("a photograph of a cat", "cat") == [5]
    assert tok.word_positions("a photograph of cat", "cat") == [4]  # VOC: the class token is index 4
    assert tok.word_positions("a cat next to a cat", "cat") == [6]  # last occurrence
    assert tok.word_positions("A Photograph of a  FIRE   Hydrant.", "fire hydrant") == [5, 6, 7]
    assert tok.word_positions("the dog's bone", "dog") == [2]
    # whole words only: "sheepdog" is sheep + dog</w>, which must not count as the word "dog"
    assert tok.tokens("sheepdog")[-1] == "dog</w>"
    assert tok.word_positions("a dog and a sheepdog", "dog") == [2]  # a substring match would give [6]
    for prompt, word in [("a photograph of a sheepdog", "dog"), ("a photograph of a hotdog", "dog"),
                         ("a photograph of a cat", "ca"), ("a photograph of a cat", "at")]:
        with pytest.raises(UserError, match="does not occur"):
            tok.word_positions(prompt, word)
    with pytest.raises(UserError, match="after token 75"):
        tok.word_positions("a " * 80 + "cat", "cat")
    with pytest.raises(UserError, match="no CLIP tokens"):
        tok.word_positions("a cat", "  ")


def test_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="vocab.json"):
        CLIPTokenizer.from_dir(tmp_path)
