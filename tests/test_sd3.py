"""SD3 / SD3.5 end to end on the tiny SD3 folder (tests/tiny_sd3.py), as SD1.5 and SDXL are proven: loading the
diffusers layout (three text encoders, three tokenizers, the 16-channel VAE, the MM-DiT), the text conditioning
equal to diffusers' own `StableDiffusion3Pipeline.encode_prompt` with and without T5, the score maps equal to an
independent implementation of the method's SD3 recipe written here with diffusers + transformers in float64,
streaming, the commands, and the bad folders that must be one line. The networks' own parity tests:
tests/test_mmdit.py, tests/test_t5.py, tests/test_vae.py (SD3's VAE)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from assets import sample_image_paths
from minidiffseg.cli import main
from minidiffseg.errors import UserError
from minidiffseg.method.segmenter import Segmenter
from minidiffseg.sd import load_sd
from parity import rel_err
from reference_sd3 import JointProbs
from tiny_sd import diffusers, transformers
from tiny_sd3 import RES, TRANSFORMER_35, write_tiny_sd3_diffusers

# the SD3 recipe's constants, stated here rather than imported from the code under test (docs/sd3.md §3)
SIGMA = 0.256  # the SNR of DDPM t = 100
ANCHOR = 1  # Seg4Diff's block 9 of 24 at the same relative depth in 4 blocks: round(9 · 3 / 23)
PLUS_PLUS = 1.1 ** 2
T5_TOKENS = 256


@pytest.fixture(scope="module")
def sd3_dir(tiny_sd3_dir):
    return tiny_sd3_dir  # tests/conftest.py


@pytest.fixture(scope="module")
def sd35_dir(tmp_path_factory):
    return write_tiny_sd3_diffusers(tmp_path_factory.mktemp("tiny_sd35"), transformer=TRANSFORMER_35)


@pytest.fixture(scope="module")
def no_t5_dir(sd3_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd3_no_t5") / "sd3"
    shutil.copytree(sd3_dir, folder, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    return folder


def _text(cls, folder, config):
    """A transformers text encoder from the folder's fp32 file, built in float64 before the tensors are copied in."""
    net = cls(config.from_pretrained(folder)).double()
    missing, unexpected = net.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    # never in the files: CLIP's position ids; T5's second name for its one (shared) embedding
    assert not unexpected and all("position_ids" in k or k == "encoder.embed_tokens.weight" for k in missing)
    return net.double().eval()


class SD3Recipe:
    """The method's SD3 recipe computed with diffusers + transformers in float64: the pipeline's own prompt
    encoding (T5 when the folder has it, else its zeros), one transformer call per class with the anchor block's
    joint softmax kept in full, the class word's last CLIP token read from its image rows, S its image × image block
    with rows renormalised to 1. "++" weighs every token of the class's last word among the 77 CLIP tokens."""

    def __init__(self, folder):
        self.transformer = diffusers.SD3Transformer2DModel.from_pretrained(folder / "transformer").double().eval()
        self.vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").double().eval()
        clip = transformers.CLIPTextModelWithProjection
        t5 = (folder / "text_encoder_3").is_dir()
        self.pipe = diffusers.StableDiffusion3Pipeline(
            transformer=self.transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=self.vae,
            text_encoder=_text(clip, folder / "text_encoder", transformers.CLIPTextConfig),
            text_encoder_2=_text(clip, folder / "text_encoder_2", transformers.CLIPTextConfig),
            text_encoder_3=_text(transformers.T5EncoderModel, folder / "text_encoder_3", transformers.T5Config)
            if t5 else None,
            tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77),
            tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2", model_max_length=77),
            tokenizer_3=transformers.T5TokenizerFast.from_pretrained(folder / "tokenizer_3") if t5 else None)
        self.maps = {}
        self.transformer.set_attn_processor({n: JointProbs(n.removesuffix(".processor"), self.maps)
                                             for n in self.transformer.attn_processors})

    def encode(self, prompts: list[str]):
        states, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=T5_TOKENS)
        return states, pooled  # (B, 77 + 256, 48), (B, 64)

    def t5_position(self, prompt: str, word: str) -> int:
        """The position of `word`'s last T5 piece in the prompt's row, found on transformers' own tokens."""
        pieces = self.pipe.tokenizer_3.convert_ids_to_tokens(self.pipe.tokenizer_3(prompt).input_ids)
        return max(i for i, p in enumerate(pieces) if p == "\u2581" + word)

    @torch.no_grad()
    def __call__(self, image_path, classes, noise, res=RES, text_tokens="clip") -> torch.Tensor:
        image = Image.open(image_path).convert("RGB")
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
        x = F.interpolate(x.double().permute(2, 0, 1)[None] / 255, size=(res, res), mode="bilinear",
                          align_corners=False)
        cfg = self.vae.config
        z0 = (self.vae.encode(2 * x - 1).latent_dist.mean - cfg.shift_factor) * cfg.scaling_factor
        grid = z0.shape[-1] // 2  # one token per 2×2 latent patch
        n = grid * grid
        z_empty = self.encode([""])[0]
        tok = self.pipe.tokenizer
        scores = []
        for name in classes:
            prompt = f"a photograph of {name}"
            at = len(tok(prompt).input_ids) - 2  # the class's last token (BOS = 0)
            n_last = len(tok(name.split()[-1]).input_ids) - 2  # the tokens of the class's last word: "++"
            states, pooled = self.encode([prompt])
            w = torch.ones(states.shape[1], dtype=torch.float64)
            if text_tokens != "t5":
                w[at + 1 - n_last:at + 1] = PLUS_PLUS
            if text_tokens != "clip":  # every class word here is one piece of the tiny T5 vocabulary
                at_t5 = 77 + self.t5_position(prompt, name.split()[-1])
                w[at_t5] = PLUS_PLUS
            context = z_empty + w[None, :, None] * (states - z_empty)
            self.maps.clear()
            z_t = (1 - SIGMA) * z0 + SIGMA * noise[None].double()
            self.transformer(z_t, encoder_hidden_states=context, pooled_projections=pooled,
                             timestep=torch.tensor([1000 * SIGMA], dtype=torch.float64))
            p = self.maps[f"transformer_blocks.{ANCHOR}.attn"][0]  # (N + T, N + T)
            cross = {"clip": p[:n, n + at], "t5": p[:n, n + at_t5] if text_tokens != "clip" else None,
                     "both": (p[:n, n + at] + p[:n, n + at_t5]) / 2 if text_tokens != "clip" else None}[text_tokens]
            cross = cross.reshape(1, 1, grid, grid)
            a = (cross - cross.min()) / (cross.max() - cross.min())
            s = p[:n, :n] / p[:n, :n].sum(-1, keepdim=True)  # rows renormalised over the image keys
            refined = (s @ a.flatten()).reshape(1, 1, grid, grid)
            up = F.interpolate(refined, size=(image.height, image.width), mode="bilinear", align_corners=False)
            scores.append(((up - up.min()) / (up.max() - up.min()))[0, 0])
        return torch.stack(scores)


# ---- loading --------------------------------------------------------------------------------------------


def test_load_the_sd3_folder(sd3_dir, sd35_dir, no_t5_dir):
    sd = load_sd(sd3_dir)
    assert (sd.kind, sd.resolution, sd.t5, sd.max_sequence_length) == ("sd3", RES, True, T5_TOKENS)
    assert sd.name.startswith("SD3 (128², 4 blocks") and "T5" in sd.name
    assert sorted(sd.networks()) == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"]
    layers = sd.attention_layers()
    assert [m.block for m in layers] == [0, 1, 2, 3] and {m.kind for m in layers} == {"joint"}
    assert {m.level for m in layers} == {2}
    sd35 = load_sd(sd35_dir)
    assert sd35.kind == "sd35" and sd35.name.startswith("SD3.5 (128², 4 blocks, dual attention")
    assert [(m.block, m.kind) for m in sd35.attention_layers()][:2] == [(0, "joint"), (0, "self")]
    bare = load_sd(no_t5_dir)
    assert not bare.t5 and "networks" and "text_encoder_3" not in bare.networks() and "without T5" in bare.name
    half = load_sd(sd3_dir, variant="fp16", dtype=torch.float16)
    assert half.dtype == torch.float16 and half.vae.encoder.conv_in.weight.dtype == torch.float32  # force_upcast


@pytest.mark.parametrize("t5", [True, False], ids=["T5", "no-T5"])
def test_text_conditioning_equals_the_diffusers_pipeline(sd3_dir, no_t5_dir, t5):
    """States (CLIP-L ‖ bigG penultimate, zero-padded, then T5's 256 or diffusers' zeros) and the pooled embedding
    (L ‖ G projections) equal StableDiffusion3Pipeline.encode_prompt's, for prompts of different lengths."""
    folder = sd3_dir if t5 else no_t5_dir
    ref = SD3Recipe(folder)
    sd = load_sd(folder, dtype=torch.float64)
    prompts = ["a photograph of cat", "a photograph of a fire hydrant next to a potted plant", ""]
    with torch.no_grad():
        ours = sd.encode_text(prompts)
        states, pooled = ref.encode(prompts)
    assert states.shape == (3, 77 + T5_TOKENS, 48)
    if not t5:
        assert not states[:, 77:].any()
    for what, got, want in (("states", ours.states, states), ("pooled", ours.pooled, pooled)):
        err = rel_err(got, want)
        assert got.shape == want.shape and err <= 1e-10, \
            f"{what}: max abs {(got - want).abs().max():.3e}, max rel {err:.3e}"


# max abs error on scores in [0, 1], float64 on both sides (as on SD1.5 and SDXL: rounding stretched by the
# min-max of nearly flat random-weight maps); measured 3.4e-8 (SD3), 8.0e-8 (SD3.5), 2.6e-8 (without T5)
BOUND = 3e-7


@pytest.mark.parametrize("which", ["sd3", "sd35", "sd3-no-t5"])
def test_scores_equal_the_sd3_recipe_on_diffusers_in_float64(sd3_dir, sd35_dir, no_t5_dir, which):
    folder = {"sd3": sd3_dir, "sd35": sd35_dir, "sd3-no-t5": no_t5_dir}[which]
    image = sample_image_paths()[1]
    classes = ["cat", "fire hydrant"]
    noise = torch.randn(1, 16, RES // 8, RES // 8, generator=torch.Generator().manual_seed(3))
    seg = Segmenter.from_pretrained(folder, dtype=torch.float64)
    run = seg.run(image, classes, posterior="mean", noise=noise)
    want = SD3Recipe(folder)(image, classes, noise[0])
    err = (run.scores - want).abs().max().item()
    assert run.maps.fused.shape[-2:] == (RES // 16, RES // 16)  # A on the token grid: 8² for a 16² latent
    assert run.scores.shape == want.shape and err <= BOUND, f"{which} scores vs the recipe on diffusers: max abs {err:.3e}"


@pytest.mark.parametrize("text_tokens", ["t5", "both"])
def test_t5_class_tokens_equal_the_recipe_on_diffusers(sd3_dir, text_tokens):
    """The recipe variant that reads T5's pieces of the class word (alone, or averaged with CLIP's), "++" on them."""
    image = sample_image_paths()[1]
    classes = ["cat", "fire hydrant"]
    noise = torch.randn(1, 16, RES // 8, RES // 8, generator=torch.Generator().manual_seed(3))
    seg = Segmenter.from_pretrained(sd3_dir, dtype=torch.float64, text_tokens=text_tokens)
    run = seg.run(image, classes, posterior="mean", noise=noise)
    want = SD3Recipe(sd3_dir)(image, classes, noise[0], text_tokens=text_tokens)
    err = (run.scores - want).abs().max().item()
    assert run.scores.shape == want.shape and err <= BOUND, f"{text_tokens}: scores max abs {err:.3e}"
    clip = Segmenter.from_pretrained(sd3_dir, dtype=torch.float64).run(image, classes, posterior="mean", noise=noise)
    assert not torch.allclose(clip.scores, run.scores, atol=1e-3)  # the T5 columns are read


def test_t5_tokens_without_t5_are_one_line(no_t5_dir):
    with pytest.raises(UserError, match=r"text_tokens 't5' reads T5's tokens, but SD3 .* has no T5 encoder"):
        Segmenter.from_pretrained(no_t5_dir, text_tokens="t5")


def test_streamed_sd3_equals_resident(sd3_dir):
    image = sample_image_paths()[1]
    resident = Segmenter.from_pretrained(sd3_dir)(image, ["cat", "sofa"], seed=2)
    streamed = Segmenter.from_pretrained(sd3_dir, stream=True)(image, ["cat", "sofa"], seed=2)
    assert torch.equal(resident.scores, streamed.scores) and torch.equal(resident.mask, streamed.mask)


# ---- the recipe on a transformer -------------------------------------------------------------------------


def test_recipe_fields_on_sd3_are_one_line(sd3_dir, tiny_sd_dir):
    sd = load_sd(sd3_dir)
    with pytest.raises(UserError, match=r"diffusion transformer .*block_weights and self_blocks, not levels"):
        Segmenter(sd, block_weights={}, self_blocks=(), level_weights={1: 1.0}, self_levels=(1,))
    with pytest.raises(UserError, match=r"block_weights names block\(s\) \[7\].*blocks 0\.\.3 only"):
        Segmenter(sd, block_weights={7: 1.0})
    with pytest.raises(UserError, match=r"is a U-Net"):
        Segmenter(load_sd(tiny_sd_dir), block_weights={1: 1.0}, self_blocks=(1,))
    # a recipe the user changes: two blocks fused, S from another block, rows not renormalised
    seg = Segmenter(sd, block_weights={1: 0.5, 2: 0.5}, self_blocks=(3,), renormalise=False)
    run = seg.run(sample_image_paths()[1], ["cat"])
    assert sorted(run.maps.levels) == [1, 2] and sorted(run.maps.layers) == [
        "transformer_blocks.1.attn", "transformer_blocks.2.attn"]
    other = seg.with_recipe(renormalise=True).run(sample_image_paths()[1], ["cat"])
    assert torch.equal(other.maps.fused, run.maps.fused) and not torch.allclose(other.maps.refined, run.maps.refined)


# ---- bad folders ------------------------------------------------------------------------------------------


def _copy(src, dst, **drop):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop.get("ignore", ())))
    return dst


def test_t5_halves_alone_are_one_line(sd3_dir, tmp_path):
    lone_tokenizer = _copy(sd3_dir, tmp_path / "a", ignore=["text_encoder_3"])
    with pytest.raises(UserError, match=r"tokenizer_3/ without text_encoder_3/"):
        load_sd(lone_tokenizer)
    lone_encoder = _copy(sd3_dir, tmp_path / "b", ignore=["tokenizer_3"])
    with pytest.raises(UserError, match=r"text_encoder_3/ without tokenizer_3/"):
        load_sd(lone_encoder)


def test_a_4_channel_vae_is_one_line(sd3_dir, tiny_sd_dir, tmp_path):
    mixed = _copy(sd3_dir, tmp_path / "mixed", ignore=["vae"])
    shutil.copytree(tiny_sd_dir / "vae", mixed / "vae")
    with pytest.raises(UserError, match=r"patches 16-channel latents but vae/ makes 4"):
        load_sd(mixed)


def test_a_unet_scheduler_is_one_line(sd3_dir, tmp_path):
    mixed = _copy(sd3_dir, tmp_path / "mixed")
    (mixed / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler"}))
    with pytest.raises(UserError, match=r"EulerDiscreteScheduler.*flow"):
        load_sd(mixed)


# ---- the commands ----------------------------------------------------------------------------------------


def test_segment_and_maps_on_sd3(no_t5_dir, tmp_path, capsys):
    image = sample_image_paths()[1]
    assert main(["segment", str(image), "--weights", str(no_t5_dir), "--classes", "cat,sofa",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "SD3 (128², 4 blocks" in out and "without T5" in out
    assert main(["maps", str(image), "--weights", str(no_t5_dir), "--classes", "cat", "--out",
                 str(tmp_path / "maps.png")]) == 0
    assert "1 blocks" in capsys.readouterr().out and Image.open(tmp_path / "maps.png").width > 0


def test_the_explorer_refuses_sd3_in_one_line(no_t5_dir):
    from minidiffseg.explorer.state import Exploration

    with pytest.raises(UserError, match=r"explorer reads U-Nets.*diffusion transformer"):
        Exploration.run(Segmenter.from_pretrained(no_t5_dir), sample_image_paths()[1], ["cat"])


def test_inspect_weights_knows_the_sd3_folder(sd3_dir, capsys):
    assert main(["inspect-weights", str(sd3_dir)]) == 0
    out = capsys.readouterr().out
    assert "diffusers SD3 (128², 4 blocks) with T5 folder" in out and "T5 encoder" in out and "transformer" in out
    assert "OK:" in out
