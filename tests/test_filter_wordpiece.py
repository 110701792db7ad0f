"""Our WordPiece tokenizer (BLIP's text side) vs transformers' BERT tokenizers on the real
bert-base-uncased vocabulary: the pure-Python `BertTokenizerLegacy` (BERT's original algorithm)
and the `tokenizers`-backed `BertTokenizer`, on a few hundred strings; decoding too."""

import random

import pytest

from assets import bert_vocab_path, require
from minidiffseg.filter.wordpiece import WordPieceTokenizer

transformers = require("transformers")  # the reference tokenizer (test-only)

TRICKY = [
    "", " ", "a photograph of cat", "a photography of motorbike", "A Photograph Of TVMONITOR",
    "a man riding a motorcycle down a street.", "isn't it? they're here, we've gone; I'm ok!",
    "the cat's toy", "hot-dog stand", "hotdog", "fire hydrant", "teddy bear", "toothbrus",
    "Café naïve résumé façade Ångström", "東京タワー and 北京", "emoji 😀 test 🚲", "tabs\tand\nnewlines\r\n",
    "control\x00chars\x07here", "zero\u200bwidth", "non\u00a0breaking space", "x" * 99, "y" * 101,
    "supercalifragilisticexpialidocious", "unbelievably", "123 4567 3.14 1,000,000", "$5 & 10% @home #tag",
    "(parentheses) [brackets] {braces} <angles>", "quotes \"double\" 'single' `back`", "—em dash– en dash",
    "[CLS] [SEP] [PAD] [MASK] [UNK]", "[DEC] a picture of", "[ENC]", "ümlaut ÜMLAUT", "ﬁ ligature",
    "a photograph of pottedplant", "diningtable", "aeroplane over the sea", "Ⅻ roman", "ＦＵＬＬ　ｗｉｄｔｈ",
]


def strings() -> list[str]:
    """The tricky strings, BLIP-like captions and random mixes: 320 in all."""
    rng = random.Random(0)
    words = [w for w in bert_vocab_path().read_text(encoding="utf-8").split("\n") if w.isalpha()]
    pieces = words + list(".,!?'-;:()\"/") + ["é", "ß", "中", "😀", "\t", "  ", "n't", "'s", "##ing"]
    out = list(TRICKY)
    while len(out) < 320:
        n = rng.randint(1, 14)
        text = " ".join(rng.choice(pieces) for _ in range(n))
        if rng.random() < 0.3:  # glue some words together: unknown words and ## pieces
            text = text.replace(" ", "", rng.randint(1, 3))
        if rng.random() < 0.3:
            text = text.upper() if rng.random() < 0.5 else text.title()
        out.append(text)
    return out


@pytest.fixture(scope="module")
def tokenizers():
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    path = bert_vocab_path()
    legacy, fast = BertTokenizerLegacy(vocab_file=str(path)), transformers.BertTokenizer(vocab=str(path))
    for t in (legacy, fast):  # BLIP's additions
        t.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return WordPieceTokenizer.from_vocab(path), legacy, fast


def test_encode_matches_transformers(tokenizers):
    ours, legacy, fast = tokenizers
    texts = strings()
    assert len(texts) >= 300
    for text in texts:
        got = ours.encode(text)
        assert got == legacy.encode(text, add_special_tokens=False), f"{text!r} vs BertTokenizerLegacy"
        assert got == fast.encode(text, add_special_tokens=False), f"{text!r} vs BertTokenizer"


def test_decode_matches_transformers(tokenizers):
    """Decoding as BLIP's processor does it: special tokens skipped, tokenization spaces cleaned."""
    ours, legacy, _ = tokenizers
    for text in strings():
        ids = [ours.bos_id] + ours.encode(text) + [ours.sep_id, ours.pad_id]
        expected = legacy.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        assert ours.decode(ids) == expected, f"{text!r}: {ours.decode(ids)!r} vs {expected!r}"


def test_blip_special_tokens(tokenizers):
    ours, legacy, fast = tokenizers
    assert (ours.bos_id, ours.sep_id, ours.pad_id) == (30522, 102, 0)  # BLIP config: bos, sep, pad
    for ref in (legacy, fast):
        assert ref.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    assert ours.tok.token_to_id("[ENC]") == 30523
    assert ours.tok.get_vocab_size() == 30524  # = BLIP's text vocab_size


def test_from_dir_prefers_vocab_txt_and_reads_tokenizer_json(tmp_path, tokenizers):
    ours, _, _ = tokenizers
    (tmp_path / "vocab.txt").write_bytes(bert_vocab_path().read_bytes())
    assert WordPieceTokenizer.from_dir(tmp_path).encode("a photograph of cat") == [1037, 9982, 1997, 4937]
    (tmp_path / "vocab.txt").unlink()
    ours.tok.save(str(tmp_path / "tokenizer.json"))  # the hub folder also has a tokenizer.json
    again = WordPieceTokenizer.from_dir(tmp_path)
    assert [again.encode(t) for t in TRICKY] == [ours.encode(t) for t in TRICKY]
    assert again.bos_id == 30522
