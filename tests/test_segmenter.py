"""The whole method on the tiny SD1.5: the score maps equal an independent implementation of the
official recipe written here with diffusers + transformers; batching; prompts; real photos; errors."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from assets import require, sample_image_paths
from minidiffseg.errors import UserError
from minidiffseg.method.fusion import DEFAULT_LEVEL_WEIGHTS
from minidiffseg.method.prompts import template_prompt, user_prompt
from minidiffseg.method.segmenter import Segmenter

RES = 128  # the official 512² would only be slower here: levels are relative, the code path is the same


@pytest.fixture(scope="module")
def seg64(tiny_sd_dir):
    return Segmenter.from_pretrained(tiny_sd_dir, dtype=torch.float64, resolution=RES)


@pytest.fixture(scope="module")
def seg32(tiny_sd_dir):
    return Segmenter.from_pretrained(tiny_sd_dir, resolution=RES)


class StoreProbs:
    """The official code's way: every attention layer hands over its full probabilities."""

    def __init__(self, name, out):
        self.name, self.out = name, out

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = (attn.head_to_batch_dim(f(x)) for f, x in ((attn.to_q, hidden_states), (attn.to_k, ctx), (attn.to_v, ctx)))
        probs = attn.get_attention_scores(q, k, None)  # (heads, N, T) for batch 1
        self.out.setdefault(self.name, []).append(probs)
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))


def official_scores(folder, image_path, classes, noise, res=RES, template="a photograph of {}"):
    """DiffSegmenter as the official code computes it (docs/design.md §5), per class, in float64."""
    diffusers, transformers = require("diffusers"), require("transformers")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").double().eval()
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").double().eval()
    # transformers 5 prefers model.fp16.safetensors when both files are there: load the fp32 file by hand
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    missing, unexpected = text.load_state_dict(load_file(folder / "text_encoder" / "model.safetensors"), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    text = text.double().eval()  # float64 works in transformers 5
    tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    probs = {}
    unet.set_attn_processor({n: StoreProbs(n.removesuffix(".processor"), probs) for n in unet.attn_processors})

    def encode(prompt):
        ids = tok(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return text(ids).last_hidden_state.double()

    image = Image.open(image_path).convert("RGB")
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3).double()
    x = F.interpolate(x.permute(2, 0, 1)[None] / 255, size=(res, res), mode="bilinear", align_corners=False)
    with torch.no_grad():
        z0 = vae.encode(2 * x - 1).latent_dist.mean * 0.18215
        z_t = sched.add_noise(z0, noise.double(), torch.tensor([100]))
        z_empty = encode("")
        scores = []
        for c in classes:
            prompt = template.format(c)
            start = len(tok(template.split("{}")[0].strip()).input_ids) - 1  # BOS + prefix tokens
            n_name = len(tok(c).input_ids) - 2
            n_last = len(tok(c.split()[-1]).input_ids) - 2
            w = torch.ones(77, dtype=torch.float64)
            w[start + n_name - n_last:start + n_name] = 1.21  # "++" on the class's last word
            context = z_empty + w[None, :, None] * (encode(prompt) - z_empty)
            probs.clear()
            unet(z_t, 100, context)
            token = start + n_name - 1  # the class name's last token
            side = z0.shape[-1]
            a = 0
            for level, weight in DEFAULT_LEVEL_WEIGHTS.items():
                n = (side // level) ** 2
                cross = [p[0][..., token] for name, p in probs.items() if name.endswith("attn2") and p[0].shape[1] == n]
                m = torch.stack(cross).mean(0).mean(0).reshape(1, 1, side // level, side // level)
                m = F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False)
                a = a + weight * (m - m.min()) / (m.max() - m.min())
            s = torch.stack([p[0].mean(0) for name, p in probs.items()
                             if name.endswith("attn1") and p[0].shape[1] == side * side]).mean(0)  # (HW, HW)
            refined = (s @ a.flatten()).reshape(1, 1, side, side)
            up = F.interpolate(refined, size=(image.height, image.width), mode="bilinear", align_corners=False)[0, 0]
            scores.append((up - up.min()) / (up.max() - up.min()))
    return torch.stack(scores)


def test_scores_equal_the_official_recipe_in_float64(seg64, tiny_sd_dir):
    image = sample_image_paths()[1]  # chelsea, 451×300: not square
    classes = ["cat", "fire hydrant", "sofa"]
    noise = torch.randn(1, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(3))
    ours = seg64(image, classes, posterior="mean", noise=noise).scores
    want = official_scores(tiny_sd_dir, image, classes, noise)
    err = (ours - want).abs().max().item()
    assert ours.shape == want.shape and err <= 1e-4, f"scores vs official recipe: max abs error {err:.3e}"


def test_batched_equals_separate_passes(seg64):
    image = sample_image_paths()[0]
    classes = ["cat", "person", "potted plant"]
    together = seg64(image, classes, seed=5)
    for i, c in enumerate(classes):
        alone = seg64(image, [c], seed=5)
        err = (together.scores[i] - alone.scores[0]).abs().max().item()
        assert err <= 1e-9, f"{c}: batched vs alone max abs error {err:.3e}"
    grouped = Segmenter(seg64.sd, resolution=RES, class_batch=2)(image, classes, seed=5)
    assert (grouped.scores - together.scores).abs().max() <= 1e-9


def test_plus_plus_reweighting_formula(seg64):
    sd = seg64.sd
    tok, enc = sd.tokenizer, sd.text_encoder
    row = template_prompt(tok, "potted plant")
    got = seg64.encode_text([row])[0]
    ids = tok(["a photograph of potted plant"])
    z, z0 = enc(ids)[0], enc(tok([""]))[0]
    w = torch.ones(77, 1, dtype=z.dtype)
    pos = tok.word_positions("a photograph of potted plant", "plant")
    w[pos] = 1.21  # only the last word carries "++"
    assert pos == [5] and torch.allclose(got, z0 + w * (z - z0), atol=1e-12)
    assert row.select[:, 0].nonzero().flatten().tolist() == [5]  # the map reads the last token
    # marks in a user prompt add no token and set the weight they say
    marked = user_prompt(tok, "plant", "a potted plant-- next to a cat++")
    assert torch.equal(tok([marked.text]), tok(["a potted plant next to a cat"]))
    assert marked.weights[3].item() == pytest.approx(0.81) and marked.weights[7].item() == pytest.approx(1.21)
    # the "-ing" rule: the next word's first token joins the class map
    ing = template_prompt(tok, "cat", caption="a photograph of cat sleeping on a sofa")
    assert ing.select[:, 0].nonzero().flatten().tolist() == [4, 5]


def test_joint_mode_reads_every_class_from_one_row(seg64):
    image = sample_image_paths()[0]
    r = seg64(image, ["cat", "dog"], joint=True)
    assert r.prompts == ["a photograph of cat and dog"] and r.scores.shape[0] == 2
    assert not torch.allclose(r.scores[0], r.scores[1])


def _variants(tmp_path):
    """Real photos in several sizes and modes, plus CMYK, palette, EXIF-rotated and 1×1 cases."""
    paths = sample_image_paths()
    base = Image.open(paths[1])
    extra = {"cmyk.jpg": base.convert("CMYK"), "palette.png": base.convert("P"), "tiny.png": base.resize((1, 1))}
    for name, im in extra.items():
        im.save(tmp_path / name)
    rotated = base.copy()
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise on display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    return paths + [tmp_path / n for n in extra] + [tmp_path / "rotated.jpg"]


def test_real_photos_of_many_sizes_and_modes(seg32, tmp_path):
    for path in _variants(tmp_path):
        im = Image.open(path)
        w, h = (im.height, im.width) if path.name == "rotated.jpg" else (im.width, im.height)
        r = seg32(path, ["cat", "dog", "person"], seed=0)
        assert r.scores.shape == (3, h, w) and r.mask.shape == (h, w), path.name
        assert r.scores.min() >= 0 and r.scores.max() <= 1 and r.mask.dtype == torch.int64
        assert set(r.mask.unique().tolist()) <= {0, 1, 2, 3}
    again = seg32(path, ["cat", "dog", "person"], seed=0)
    other = seg32(path, ["cat", "dog", "person"], seed=1)
    assert torch.equal(r.scores, again.scores), "same seed must give the same scores"
    assert not torch.allclose(r.scores, other.scores), "different seeds must differ"


@pytest.mark.parametrize("classes, message", [
    ([], "empty"),
    (["cat", "Cat"], "twice"),
    (["  "], "empty or whitespace"),
    (["cat " * 80], "CLIP tokens long"),
])
def test_bad_class_lists(seg32, classes, message):
    with pytest.raises(UserError, match=message):
        seg32(sample_image_paths()[0], classes)


def test_bad_images_and_weights(seg32, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for path, message in ((tmp_path / "missing.png", "no such file"), (tmp_path / "empty.png", "empty"),
                          (tmp_path / "text.png", "not a readable image")):
        with pytest.raises(UserError, match=message):
            seg32(path, ["cat"])
    with pytest.raises(UserError, match="download"):
        Segmenter.from_pretrained(tmp_path / "no-weights-here")
