"""Our CLIPModel (image tower + shared text tower + projections) vs transformers' `CLIPModel` on
identical random weights (docs/design.md §7.2), CLIP's preprocessing vs `CLIPImageProcessorPil` on real
photos, the zero-shot scores and the relative keep rule, and the full-size inventory (§7.3)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from assets import require, sample_image_paths, write_sd15_tokenizer
from minidiffseg.errors import UserError
from minidiffseg.filter.clip_model import CLIPConfig, CLIPModel, ZeroShotCLIP, clip_preprocess
from minidiffseg.filter.filters import ClipFilter, keep_near_best
from minidiffseg.vocabularies import get_vocabulary
from parity import errors

transformers = require("transformers")  # the reference CLIP (test-only)

BOS, EOS = 49406, 49407


def reference_config(cfg: CLIPConfig):
    text = {**vars(cfg.text), "hidden_act": "quick_gelu", "bos_token_id": BOS, "eos_token_id": EOS}
    vision = {**vars(cfg.vision), "hidden_act": "quick_gelu"}
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)


def save_tiny_clip(folder, with_tokenizer: bool = True):
    """A tiny random transformers CLIPModel saved as on the hub (model.safetensors + config.json
    [+ CLIP's real vocab.json/merges.txt]); LayerNorms randomised too. Returns the reference."""
    torch.manual_seed(0)
    ref = transformers.CLIPModel(reference_config(CLIPConfig.tiny())).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:  # default init is weight 1, bias 0: make them count
                p.add_(0.2 * torch.randn_like(p))
        ref.logit_scale.fill_(2.0)
    ref.save_pretrained(folder, safe_serialization=True)
    if with_tokenizer:
        write_sd15_tokenizer(folder)
    return ref


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    ref = save_tiny_clip(folder)
    return ref, CLIPModel.from_pretrained(folder), folder


def test_embeddings_and_logits_match_transformers(models):
    ref, ours, folder = models
    from minidiffseg.sd.tokenizer import CLIPTokenizer

    ids = CLIPTokenizer.from_dir(folder)(["a photo of a cat.", "a photo of a tv monitor.", "a dog"])  # (3, 77)
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=px)
        image, text = ours.image_embeds(px), ours.text_embeds(ids, EOS)
        logits = ours.logits(image, text)
    for name, got, want in [("image_embeds", image, expected.image_embeds), ("text_embeds", text, expected.text_embeds),
                            ("logits_per_image", logits, expected.logits_per_image)]:
        abs_err, rel_err = errors(got, want)
        assert rel_err <= 1e-5, f"{name}: max abs err {abs_err:.3g}, max rel err {rel_err:.3g}"


def test_preprocess_matches_transformers_on_real_photos():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil()
    for path in sample_image_paths():
        image = Image.open(path).convert("RGB")
        expected = processor(image, return_tensors="pt")["pixel_values"]
        got = clip_preprocess(image)
        assert got.shape == expected.shape == (1, 3, 224, 224), path.name
        err = (got - expected).abs().max().item()
        assert err <= 1e-6, f"{path.name}: max abs err {err:.3g}"


def test_zero_shot_scores_and_text_cache(models):
    ref, ours, folder = models
    zs = ZeroShotCLIP(ours, ZeroShotCLIP.from_pretrained(folder).tokenizer)
    names = ("cat", "dog", "potted plant")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    scores = zs.scores(image, names)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    px = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})(
        image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = ref(input_ids=zs.tokenizer([f"a photo of a {n}." for n in names]), pixel_values=px)
    expected = out.logits_per_image[0] / ref.logit_scale.exp()  # cosine similarities
    abs_err, rel_err = errors(scores, expected)
    assert rel_err <= 1e-5, f"scores: max abs err {abs_err:.3g}, max rel err {rel_err:.3g}"
    cached = zs.text_embeds(names)
    assert zs.text_embeds(names) is cached, "the text embeddings of a vocabulary are computed once"


@pytest.mark.parametrize("scores, ratio, kept", [
    ([0.30, 0.295, 0.28, 0.10], 0.97, [True, True, False, False]),  # 0.291 = 0.97 * 0.30
    ([0.30, 0.295, 0.28, 0.10], 1.0, [True, False, False, False]),  # only the best
    ([-0.20, -0.203, -0.3], 0.97, [True, True, False]),  # negative best: margin 0.03·|best|
    ([0.25], 0.97, [True]),  # never empty
])
def test_keep_near_best(scores, ratio, kept):
    assert keep_near_best(torch.tensor(scores), ratio).tolist() == kept


def test_clip_filter_keeps_the_best_classes(models):
    _, ours, folder = models
    vocab = get_vocabulary("voc")
    filt = ClipFilter(vocab, ZeroShotCLIP(ours, ZeroShotCLIP.from_pretrained(folder).tokenizer), ratio=0.97)
    image = Image.open(sample_image_paths()[1])
    d = filt.details(image)
    scores = d["clip_scores"]
    assert list(scores) == list(vocab.classes[1:]), "one score per prompted class, background never"
    best = max(scores.values())
    assert d["classes"] == [c for c, s in scores.items() if s >= best - 0.03 * abs(best) - 1e-5]
    assert d["classes"] and filt(image) == d["classes"]
    assert filt.names[vocab.classes.index("pottedplant") - 1] == "potted plant", "readable CLIP names"


def test_full_size_inventory_matches_transformers():
    cfg = CLIPConfig()
    with torch.device("meta"):
        ref = transformers.CLIPModel(reference_config(cfg))
        ours = CLIPModel(cfg)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected, f"missing {sorted(expected.keys() - got.keys())[:5]}, extra {sorted(got.keys() - expected.keys())[:5]}"
    assert "vision_model.pre_layrnorm.weight" in got
    assert sum(v.numel() for v in ours.parameters()) == 427_616_513  # clip-vit-large-patch14's count


def test_config_from_transformers_json(models):
    _, ours, _ = models
    tiny = CLIPConfig.tiny()  # the saved config names CLIP's real EOS id (reference_config), not the legacy 2
    assert ours.cfg == replace(tiny, text=replace(tiny.text, eos_token_id=EOS))


def test_missing_weights_and_tokenizer(tmp_path):
    with pytest.raises(UserError, match="openai/clip-vit-large-patch14") as e:
        ZeroShotCLIP.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)
    save_tiny_clip(tmp_path, with_tokenizer=False)
    with pytest.raises(UserError, match="vocab.json"):
        ZeroShotCLIP.from_pretrained(tmp_path)
