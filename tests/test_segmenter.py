"""The whole method on the tiny SD1.5: the score maps equal an independent implementation of the
official recipe written here with diffusers + transformers; batching; prompts; real photos; errors."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from assets import require, sample_image_paths
from reference_sd import StoreEveryMap
from reference_decode import reference_rgb
from minidiffseg.errors import UserError
from minidiffseg.image import load_image, pixels
from minidiffseg.method.prompts import template_prompt, user_prompt
from minidiffseg.method.segmenter import Segmenter

RES = 128  # the official 512² would only be slower here: levels are relative, the code path is the same


# the official recipe's constants, stated here rather than imported from the code under test (docs/design.md §5)
OFFICIAL_LEVEL_WEIGHTS = {8: 0.3, 4: 0.5, 2: 0.1, 1: 0.1}  # 8×8: 0.3, 16×16: 0.5, 32×32: 0.1, 64×64: 0.1 at 512²
PLUS_PLUS = 1.1 ** 2  # "++" on the class's last word
SCALE = 0.18215  # SD1.5's latent scaling factor


class OfficialRecipe:
    """DiffSegmenter as the official code computes it (docs/design.md §5), written here with diffusers +
    transformers, in float64: one U-Net call per prompt row and timestep with an attention processor that
    keeps every probability matrix (bench/baseline.py StoreEveryMap), token columns read from those
    matrices, the official per-level min-max, the full S = mean of the 64² self-attention matrices built."""

    def __init__(self, folder):
        diffusers, transformers = require("diffusers"), require("transformers")
        self.unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").double().eval()
        self.vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").double().eval()
        # transformers 5 prefers model.fp16.safetensors when both files are there: load the fp32 file by hand
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        missing, unexpected = text.load_state_dict(load_file(folder / "text_encoder" / "model.safetensors"),
                                                   strict=False)
        assert not unexpected and all("position_ids" in k for k in missing)
        self.text = text.double().eval()  # float64 works in transformers 5
        self.tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        self.maps = {}  # {layer: (B, heads, N, T)} of the last U-Net call
        self.unet.set_attn_processor({n: StoreEveryMap(n.removesuffix(".processor"), self.maps)
                                      for n in self.unet.attn_processors})

    def n_tokens(self, text: str) -> int:
        return len(self.tok(text).input_ids) - 2  # without BOS and EOS

    def encode(self, prompt: str) -> torch.Tensor:
        ids = self.tok(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return self.text(ids).last_hidden_state.double()  # (1, 77, D)

    def rows(self, classes, template: str, joint: bool):
        """[(prompt, weights (77,), [token positions of each class named in it])]: one row per class, or one
        row 'template with "c1 and c2 and ..."' naming every class (joint)."""
        out = []
        for names in [classes] if joint else [[c] for c in classes]:
            w, spans = torch.ones(77, dtype=torch.float64), []
            at = 1 + self.n_tokens(template.split("{}")[0])  # BOS, then the template's words before the class
            for name in names:
                n_name, n_last = self.n_tokens(name), self.n_tokens(name.split()[-1])
                w[at + n_name - n_last:at + n_name] = PLUS_PLUS
                spans.append(list(range(at, at + n_name)))
                at += n_name + self.n_tokens("and")
            out.append((template.format(" and ".join(names)), w, spans))
        return out

    @torch.no_grad()
    def __call__(self, image_path, classes, noises, *, res=RES, template="a photograph of {}", timesteps=(100,),
                 joint=False, tokens="last", posterior="mean", seed=0) -> torch.Tensor:
        """(C, H, W) scores; noises (T, 4, h, w): one per timestep."""
        image = Image.open(image_path).convert("RGB")
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
        x = F.interpolate(x.double().permute(2, 0, 1)[None] / 255, size=(res, res), mode="bilinear",
                          align_corners=False)
        dist = self.vae.encode(2 * x - 1).latent_dist
        z0 = SCALE * (dist.mean if posterior == "mean" else dist.sample(torch.Generator().manual_seed(seed)))
        side = z0.shape[-1]
        z_empty = self.encode("")
        scores = []
        for prompt, w, spans in self.rows(classes, template, joint):
            context = z_empty + w[None, :, None] * (self.encode(prompt) - z_empty)
            passes = []  # per timestep: {layer: (heads, N, 77)} of this row
            for t, noise in zip(timesteps, noises):
                self.maps.clear()
                self.unet(self.sched.add_noise(z0, noise[None].double(), torch.tensor([t])), t, context)
                passes.append({name: m[0] for name, m in self.maps.items()})
            s = torch.stack([p[name].mean(0) for p in passes for name in p
                             if name.endswith("attn1") and p[name].shape[1] == side * side]).mean(0)  # (HW, HW)
            for span in spans:
                columns = span if tokens == "all" else span[-1:]
                a = 0
                for level, weight in OFFICIAL_LEVEL_WEIGHTS.items():
                    n = side // level
                    cross = [p[name][..., columns].mean(-1).mean(0) for p in passes for name in p
                             if name.endswith("attn2") and p[name].shape[1] == n * n]  # layers × passes of (N,)
                    m = torch.stack(cross).mean(0).reshape(1, 1, n, n)
                    m = F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False)
                    a = a + weight * (m - m.min()) / (m.max() - m.min())
                refined = (s @ a.flatten()).reshape(1, 1, side, side)
                up = F.interpolate(refined, size=(image.height, image.width), mode="bilinear", align_corners=False)
                scores.append(((up - up.min()) / (up.max() - up.min()))[0, 0])
        return torch.stack(scores)


@pytest.fixture(scope="module")
def official(tiny_sd_dir):
    return OfficialRecipe(tiny_sd_dir)


# off-default options: (Segmenter options, call options, reference options); bound: see the test
OPTIONS = {
    "default": ({}, {}, {}),
    "timesteps 50,100": ({"timesteps": (50, 100)}, {}, {"timesteps": (50, 100)}),
    "joint": ({}, {"joint": True}, {"joint": True}),
    "tokens all": ({"tokens": "all"}, {}, {"tokens": "all"}),
    "posterior sample": ({}, {"posterior": "sample", "seed": 7}, {"posterior": "sample", "seed": 7}),
    "template": ({"template": "a blurry photo of the {} outdoors"}, {},
                 {"template": "a blurry photo of the {} outdoors"}),
}
# max abs error on scores in [0, 1]: float64 rounding, stretched by the min-max of nearly flat random-weight maps;
# measured 1.5e-8 (default) ... 4.5e-8 (joint)
BOUND = 3e-7


@pytest.mark.parametrize("case", OPTIONS)
def test_scores_equal_the_official_recipe_in_float64(seg64, official, case):
    """Value for value, in float64, with every option off the default path: several timesteps, joint mode,
    all tokens of a multi-token name, the posterior sampled from the seed, another template."""
    options, call, reference = OPTIONS[case]
    image = sample_image_paths()[1]  # chelsea, 451×300: not square
    classes = ["cat", "fire hydrant", "pottedplant"]  # two words; one word of two BPE tokens (potted, plant)
    n_steps = len(options.get("timesteps", (100,)))
    noise = torch.randn(n_steps, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(3))
    seg = Segmenter(seg64.sd, resolution=RES, **options) if options else seg64
    ours = seg(image, classes, noise=noise, **{"posterior": "mean", **call}).scores
    want = official(image, classes, noise, **reference)
    err = (ours - want).abs().max().item()
    assert ours.shape == want.shape and err <= BOUND, f"{case}: scores vs official recipe: max abs error {err:.3e}"


def test_batched_equals_separate_passes(seg64):
    image = sample_image_paths()[0]
    classes = ["cat", "person", "potted plant"]
    bound = 1e-12  # float64; measured ≤ 1.3e-13 (the batch changes only the order of some sums)
    together = seg64(image, classes, seed=5)
    for i, c in enumerate(classes):
        alone = seg64(image, [c], seed=5)
        err = (together.scores[i] - alone.scores[0]).abs().max().item()
        assert err <= bound, f"{c}: batched vs alone max abs error {err:.3e}"
    grouped = Segmenter(seg64.sd, resolution=RES, class_batch=2)(image, classes, seed=5)
    err = (grouped.scores - together.scores).abs().max().item()
    assert err <= bound, f"class_batch=2 vs all at once: max abs error {err:.3e}"


def test_plus_plus_reweighting_formula(seg64):
    sd = seg64.sd
    tok, enc = sd.tokenizer, sd.text_encoder
    row = template_prompt(tok, "potted plant")
    got = seg64.encode_text([row]).states[0]
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
        # the pixels the segmenter reads equal an independent conversion of the stored values (CMYK, palette,
        # grey, alpha, EXIF orientation: tests/reference_decode.py)
        want, tolerance = reference_rgb(path)
        err = (pixels(load_image(path)).int() - torch.from_numpy(want).int()).abs().max().item()
        assert err <= tolerance, f"{path.name}: decoded pixels differ by {err} levels from the stored values"
        h, w = want.shape[:2]
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
