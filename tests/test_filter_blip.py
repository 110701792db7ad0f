"""Our BLIP captioner vs transformers' `BlipForConditionalGeneration` on identical random weights
(docs/design.md §7.2): logits of a prefix, and identical greedy token ids for conditional and unconditional
captioning, one prompt at a time in transformers vs one left-padded batch in ours; the pixel
preprocessing vs `BlipImageProcessorPil`; the full-size inventory (docs/design.md §7.3)."""

import numpy as np
import pytest
import torch
from PIL import Image

from assets import bert_vocab_path, require
from minidiffseg.errors import UserError
from minidiffseg.filter.blip import (BlipConfig, BlipForConditionalGeneration, Captioner, blip_preprocess)
from minidiffseg.filter.wordpiece import WordPieceTokenizer
from parity import errors

transformers = require("transformers")  # the reference BLIP (test-only)

CLS, SEP, DEC = 101, 102, 30522  # bert-base-uncased [CLS]/[SEP]; BLIP's [DEC]
SEP_BIAS = 6.0  # makes [SEP] win at some steps of the tiny random model, so some captions end early


def reference_config(cfg: BlipConfig):
    return transformers.BlipConfig(text_config=dict(vars(cfg.text)), vision_config=dict(vars(cfg.vision)))


def save_tiny_blip(folder, with_vocab: bool = True):
    """A tiny random BlipForConditionalGeneration saved as on the hub (model.safetensors +
    config.json [+ the real bert-base-uncased vocab.txt]); returns the reference model. Weights are
    N(0, 0.5) matrices and N(1, 0.2) LayerNorm scales: greedy decoding then varies its tokens."""
    torch.manual_seed(0)
    ref = transformers.BlipForConditionalGeneration(reference_config(BlipConfig.tiny())).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(0, 0.5 if p.ndim > 1 else 0.2)
            if p.ndim == 1 and name.endswith("weight"):  # LayerNorm scales around 1
                p.add_(1.0)
        ref.text_decoder.cls.predictions.bias[SEP] = SEP_BIAS  # tied to the LM head's decoder.bias
    ref.save_pretrained(folder, safe_serialization=True)
    if with_vocab:
        (folder / "vocab.txt").write_bytes(bert_vocab_path().read_bytes())
    return ref


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip")
    ref = save_tiny_blip(folder)
    return ref, BlipForConditionalGeneration.from_pretrained(folder), folder


def pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(models):
    ref, ours, _ = models
    ids = torch.tensor([[DEC, 1037, 9982, 1997, 4937], [DEC, 1037, 3899, 2006, 1037]])  # "a photograph of cat"...
    px = pixels().expand(2, -1, -1, -1)
    with torch.no_grad():
        expected = ref(pixel_values=px, input_ids=ids).logits
        got = ours.logits(px, ids)
    abs_err, rel_err = errors(got, expected)
    assert rel_err <= 1e-5, f"logits: max abs err {abs_err:.3g}, max rel err {rel_err:.3g}"


PREFIXES = [[], [1037, 9982, 1997, 4937], [1037, 9982, 1997, 5013, 5638, 3489], [1037, 3899],
            [1037, 9982, 1997, 1037, 2158, 5559, 1037, 3829, 2006, 1996, 2395, 2012, 2305, 1998]]


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_ids_match_transformers(models, seed):
    """Unconditional ([]) and conditional prefixes of several lengths, batched in ours; each
    reference call sees one prompt as transformers' processor makes it: [CLS] prefix [SEP]."""
    ref, ours, _ = models
    px = pixels(seed)
    got = ours.generate(px, [[DEC] + p for p in PREFIXES], max_length=20)
    for p, g in zip(PREFIXES, got):
        expected = ref.generate(pixel_values=px, input_ids=torch.tensor([[CLS] + p + [SEP]]),
                                max_length=20, do_sample=False, num_beams=1)[0].tolist()
        assert g == expected, f"prefix {p}: ours {g} vs transformers {expected}"
    lengths = [len(g) for g in got]
    assert min(lengths) < 20 and max(lengths) == 20, f"want early [SEP] stops and full-length rows: {lengths}"
    assert all(len(set(g[len(p) + 1:])) > 2 for g, p in zip(got, PREFIXES) if len(g) - len(p) > 5), \
        f"degenerate greedy decoding (one repeated token): {got}"


def test_generate_respects_max_length(models):
    _, ours, _ = models
    out = ours.generate(pixels(), [[DEC] + PREFIXES[4], [DEC]], max_length=17)
    assert len(out[0]) <= 17 and len(out[1]) <= 17 and out[0][:15] == [DEC] + PREFIXES[4]
    assert ours.generate(pixels(), [[DEC, 1037, 3899]], max_length=3) == [[DEC, 1037, 3899]]  # already full


def test_captioner_text_matches_transformers_pipeline(models):
    """Image -> caption strings, the whole chain: our preprocessing, tokenizer, batched decoding and
    decode vs BlipImageProcessorPil + BertTokenizer + generate + decode(skip_special_tokens)."""
    ref, ours, folder = models
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    tok = BertTokenizerLegacy(vocab_file=str(bert_vocab_path()))
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    px = BlipImageProcessorPil(size={"height": 64, "width": 64})(image, return_tensors="pt")["pixel_values"]
    prefixes = ["a photograph of cat", "a photography of motorbike", ""]
    captioner = Captioner.from_pretrained(folder)
    got = captioner.caption(image, prefixes)
    for prefix, text in zip(prefixes, got):
        ids = ref.generate(pixel_values=px, input_ids=torch.tensor([tok.encode(prefix)]), max_length=20)[0]
        expected = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        assert text == expected, f"prefix {prefix!r}: ours {text!r} vs transformers {expected!r}"
        assert text.startswith(prefix)
    assert captioner.caption(image) == got[2:], "default = one unconditional caption"


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (384, 384), (37, 1000)])
def test_preprocess_matches_transformers(size):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = BlipImageProcessorPil()(image, return_tensors="pt")["pixel_values"]
    got = blip_preprocess(image)
    assert got.shape == expected.shape == (1, 3, 384, 384)
    assert (got - expected).abs().max().item() <= 1e-6, f"max abs err {(got - expected).abs().max().item():.3g}"


def test_full_size_inventory_matches_transformers():
    """Every tensor name and shape of blip-image-captioning-large: our module vs the reference's
    state dict minus the LM head's decoder (tied to the word embeddings, never built by us)."""
    cfg = BlipConfig()
    with torch.device("meta"):
        ref = transformers.BlipForConditionalGeneration(reference_config(cfg))
        ours = BlipForConditionalGeneration(cfg)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()
                if k not in BlipForConditionalGeneration.IGNORED}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected, f"missing {sorted(expected.keys() - got.keys())[:5]}, extra {sorted(got.keys() - expected.keys())[:5]}"
    # 446.3M + the tied decoder copy (30524 x 768) = the hub's "470M params"
    assert sum(v.numel() for v in ours.parameters()) == 446_290_492


def test_config_from_transformers_json(models):
    _, ours, folder = models
    assert ours.cfg == BlipConfig.tiny()
    real = {"text_config": {"num_attention_heads": 12, "vocab_size": 30524},  # encoder_hidden_size absent,
            "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24}}  # as in the hub's config.json
    assert BlipConfig.from_transformers(real) == BlipConfig()


def test_missing_and_mismatched_weights(tmp_path):
    with pytest.raises(UserError, match="Salesforce/blip-image-captioning-large"):
        BlipForConditionalGeneration.from_pretrained(tmp_path)
    save_tiny_blip(tmp_path, with_vocab=False)
    (tmp_path / "config.json").unlink()  # defaults = the full-size model: every shape differs
    with pytest.raises(UserError, match="model.safetensors") as e:
        BlipForConditionalGeneration.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="vocab.txt or tokenizer.json"):
        WordPieceTokenizer.from_dir(tmp_path)
