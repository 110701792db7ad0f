"""SDXL end to end on the tiny SDXL folder (tests/tiny_sdxl.py), as SD1.5 and SD2.x are proven: loading the
diffusers layout (both text towers, both tokenizers, the float32 VAE), the text conditioning equal to diffusers'
own `StableDiffusionXLPipeline.encode_prompt`, the score maps equal to an independent implementation of the
method's SDXL recipe written here with diffusers + transformers in float64, streaming, the commands, and the
bad folders that must be one line. The networks' own parity tests: tests/test_unet_xl.py, tests/test_clip_xl.py."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from assets import sample_image_paths
from minidiffseg.errors import UserError
from minidiffseg.method.segmenter import Segmenter
from minidiffseg.sd import hub, load_sd
from parity import rel_err
from reference_sd import StoreEveryMap
from tiny_sd import diffusers, randomise_, transformers
from tiny_sdxl import TEXT_G, TURBO_SCHEDULER, single_file_state, write_tiny_sdxl_single_file

RES = 128  # the tiny SDXL's sample_size 16 × 8
# the SDXL recipe's constants, stated here rather than imported from the code under test (docs/sdxl.md §3)
XL_LEVEL_WEIGHTS = {4: 0.5, 2: 0.1}  # the paper's weights for 32-px and 16-px cells
PLUS_PLUS = 1.1 ** 2
SCALE = 0.13025  # SDXL's latent scaling factor


@pytest.fixture(scope="module")
def xl_dir(tiny_sdxl_dir):
    return tiny_sdxl_dir  # tests/conftest.py: shared with the commands' tests (test_eval_cli.py)


@pytest.fixture(scope="module")
def xl_file(tmp_path_factory):
    return write_tiny_sdxl_single_file(tmp_path_factory.mktemp("tiny_sdxl_file") / "sd_xl_tiny.safetensors")


def _text(cls, folder):
    """A transformers text tower from the folder's fp32 file (transformers 5 would take the .fp16 one), in float64
    before the tensors are copied in (the config says float16 after the .fp16 files were saved: built in it, the
    tower would round the fp32 values)."""
    net = cls(transformers.CLIPTextConfig.from_pretrained(folder)).double()
    missing, unexpected = net.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return net.double().eval()


class XLRecipe:
    """The method's SDXL recipe computed with diffusers + transformers in float64: the pipeline's own prompt
    encoding, one U-Net call per class with every probability matrix kept, the class word's last token read from
    the cross-attention of levels 4 and 2, min-max per level, S the mean of the level-2 self-attention matrices.
    "++" weighs every token of the class's last word, as the official recipe (tests/test_segmenter.py)."""

    def __init__(self, folder):
        self.unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").double().eval()
        self.vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").double().eval()
        self.pipe = diffusers.StableDiffusionXLPipeline(
            vae=self.vae, unet=self.unet, scheduler=diffusers.EulerDiscreteScheduler(),
            text_encoder=_text(transformers.CLIPTextModel, folder / "text_encoder"),
            text_encoder_2=_text(transformers.CLIPTextModelWithProjection, folder / "text_encoder_2"),
            tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77),
            tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_2", model_max_length=77))
        self.sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        self.maps = {}
        self.unet.set_attn_processor({n: StoreEveryMap(n.removesuffix(".processor"), self.maps)
                                      for n in self.unet.attn_processors})

    def encode(self, prompts: list[str]):
        states, _, pooled, _ = self.pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        return states, pooled  # (B, 77, 64), (B, 32)

    @torch.no_grad()
    def __call__(self, image_path, classes, noise, res=RES) -> torch.Tensor:
        image = Image.open(image_path).convert("RGB")
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
        x = F.interpolate(x.double().permute(2, 0, 1)[None] / 255, size=(res, res), mode="bilinear",
                          align_corners=False)
        z0 = SCALE * self.vae.encode(2 * x - 1).latent_dist.mean
        grid = z0.shape[-1] // 2  # the refinement's grid: level 2
        z_empty = self.encode([""])[0]
        tok = self.pipe.tokenizer
        scores = []
        for name in classes:
            prompt = f"a photograph of {name}"
            at = len(tok(prompt).input_ids) - 2  # the class's last token (BOS = 0)
            n_last = len(tok(name.split()[-1]).input_ids) - 2  # the tokens of the class's last word: "++"
            w = torch.ones(77, dtype=torch.float64)
            w[at + 1 - n_last:at + 1] = PLUS_PLUS
            states, pooled = self.encode([prompt])
            context = z_empty + w[None, :, None] * (states - z_empty)
            self.maps.clear()
            time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float64)
            self.unet(self.sched.add_noise(z0, noise[None].double(), torch.tensor([100])), 100, context,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
            s = torch.stack([m[0].mean(0) for n, m in self.maps.items()
                             if n.endswith("attn1") and m.shape[2] == grid * grid]).mean(0)  # (HW, HW)
            a = 0
            for level, weight in XL_LEVEL_WEIGHTS.items():
                n = z0.shape[-1] // level
                cross = [m[0, :, :, at].mean(0) for name_, m in self.maps.items()
                         if name_.endswith("attn2") and m.shape[2] == n * n]
                mean = torch.stack(cross).mean(0).reshape(1, 1, n, n)
                mean = F.interpolate(mean, size=(grid, grid), mode="bilinear", align_corners=False)
                a = a + weight * (mean - mean.min()) / (mean.max() - mean.min())
            refined = (s @ a.flatten()).reshape(1, 1, grid, grid)
            up = F.interpolate(refined, size=(image.height, image.width), mode="bilinear", align_corners=False)
            scores.append(((up - up.min()) / (up.max() - up.min()))[0, 0])
        return torch.stack(scores)


# ---- loading --------------------------------------------------------------------------------------------

def test_load_the_sdxl_folder(xl_dir, tmp_path):
    sd = load_sd(xl_dir)
    assert (sd.kind, sd.name, sd.resolution) == ("sdxl", "SDXL (128²)", RES)
    assert sd.tokenizer.pad_id == 49407 and sd.tokenizer_2.pad_id == 0  # CLIP-L pads with EOS, bigG with "!"
    assert [m.level for m in sd.attention_layers()] and {m.level for m in sd.attention_layers()} == {2, 4}
    half = load_sd(xl_dir, dtype=torch.float16, variant="fp16")
    assert half.dtype == torch.float16 and half.vae.quant_conv.weight.dtype == torch.float32  # force_upcast
    turbo = shutil.copytree(xl_dir, tmp_path / "turbo")
    (turbo / "scheduler" / "scheduler_config.json").write_text(json.dumps(TURBO_SCHEDULER))
    sd = load_sd(turbo)
    assert (sd.kind, sd.name, sd.resolution) == ("sdxl-turbo", "SDXL-Turbo (512²)", 512)


def test_text_conditioning_equals_the_diffusers_pipeline(xl_dir):
    """States (L ‖ G penultimate) and pooled embedding equal StableDiffusionXLPipeline.encode_prompt's, for
    prompts of different lengths (bigG's rows padded with "!", CLIP-L's with EOS)."""
    ref = XLRecipe(xl_dir)
    sd = load_sd(xl_dir, dtype=torch.float64)
    prompts = ["a photograph of cat", "a photograph of a fire hydrant next to a potted plant", ""]
    with torch.no_grad():
        ours = sd.encode_text(prompts)
        states, pooled = ref.encode(prompts)
    for what, got, want in (("states", ours.states, states), ("pooled", ours.pooled, pooled)):
        err = rel_err(got, want)
        assert got.shape == want.shape and err <= 1e-10, \
            f"{what}: max abs {(got - want).abs().max():.3e}, max rel {err:.3e}"


# max abs error on scores in [0, 1], float64 on both sides: rounding stretched by the min-max of nearly flat
# random-weight maps, as on SD1.5 (tests/test_segmenter.py BOUND); measured 2.0e-8
BOUND = 3e-7


def test_scores_equal_the_sdxl_recipe_on_diffusers_in_float64(xl_dir):
    image = sample_image_paths()[1]
    classes = ["cat", "fire hydrant"]
    noise = torch.randn(1, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(3))
    seg = Segmenter.from_pretrained(xl_dir, dtype=torch.float64)
    run = seg.run(image, classes, posterior="mean", noise=noise)
    want = XLRecipe(xl_dir)(image, classes, noise[0])
    err = (run.scores - want).abs().max().item()
    assert run.maps.fused.shape[-2:] == (RES // 16, RES // 16)  # A on the level-2 grid: 8² for a 16² latent
    assert run.scores.shape == want.shape and err <= BOUND, f"SDXL scores vs the recipe on diffusers: max abs {err:.3e}"


def test_streamed_sdxl_equals_resident(xl_dir):
    image = sample_image_paths()[1]
    resident = Segmenter.from_pretrained(xl_dir)(image, ["cat", "sofa"], seed=2)
    streamed = Segmenter.from_pretrained(xl_dir, stream=True)(image, ["cat", "sofa"], seed=2)
    assert torch.equal(resident.scores, streamed.scores) and torch.equal(resident.mask, streamed.mask)


def test_the_single_file_loads_the_folders_networks(xl_dir, xl_file):
    """The same weights as one original SDXL file (CLIP-L under conditioner.embedders.0, bigG's OpenCLIP names with
    fused q/k/v and transposed projection under conditioner.embedders.1, label_emb): the networks' outputs equal
    the folder's bit for bit, and so do the segmentations; streamed, the U-Net and VAE stream (bigG's split
    projections stay resident)."""
    folder, single = load_sd(xl_dir), load_sd(xl_file)
    assert (single.kind, single.name) == ("sdxl", "SDXL (128²)") and single.vae.cfg == folder.vae.cfg
    prompts = ["a photograph of cat", ""]
    with torch.no_grad():
        a, b = folder.encode_text(prompts), single.encode_text(prompts)
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
        eps = [sd.unet(x, 100, a.states[:1], text_embeds=a.pooled[:1], time_ids=sd.time_ids(x)) for sd in (folder, single)]
    assert torch.equal(a.states, b.states) and torch.equal(a.pooled, b.pooled) and torch.equal(*eps)
    image = sample_image_paths()[1]
    want = Segmenter(folder)(image, ["cat", "sofa"], seed=1).scores
    assert torch.equal(Segmenter(single)(image, ["cat", "sofa"], seed=1).scores, want)
    assert torch.equal(Segmenter.from_pretrained(xl_file, stream=True)(image, ["cat", "sofa"], seed=1).scores, want)


def test_single_file_rules_equal_diffusers_converters():
    """Our single-file rules for the whole SDXL file give what diffusers' own converters give (CLIP-L: the prefix
    stripped; bigG: convert_open_clip_checkpoint; U-Net and VAE: convert_ldm_*), name for name and value for value."""
    from diffusers.loaders import single_file_utils as reference

    from minidiffseg.sd import ldm
    from tiny_sdxl import tiny_reference_xl

    state = single_file_state()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    unet_cfg, vae_cfg, _, _ = ldm.infer_sdxl_configs(shapes)
    names, unknown = ldm.from_ldm(shapes, unet_cfg, vae_cfg)
    assert not unknown, unknown
    unet, vae, text_l, text_g = tiny_reference_xl()
    theirs_g = reference.convert_open_clip_checkpoint(text_g, state, prefix="conditioner.embedders.1.model.")
    ours_g = {n: state[k] for k, n in names["text_encoder_2"].items()}
    ours_l = {n: state[k] for k, n in names["text_encoder"].items()}
    theirs_unet = reference.convert_ldm_unet_checkpoint(state, dict(unet.config))
    ours_unet = {n: state[k] for k, n in names["unet"].items()}
    for what, ours, theirs in (("U-Net", ours_unet, theirs_unet),
                               ("CLIP-L", ours_l, {k: v for k, v in text_l.state_dict().items()})):
        theirs = {k if what == "U-Net" or k.startswith("text_model.") else f"text_model.{k}": v for k, v in theirs.items()
                  if not k.endswith("position_ids")}
        assert set(ours) == set(theirs), f"{what}: {sorted(set(ours) ^ set(theirs))[:5]}"
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), what
    # bigG: our loaded module (OpenCLIP's names, split after loading) against the converter's state dict
    from minidiffseg.sd.openclip import from_openclip

    split = from_openclip(ours_g, text_g.config.num_hidden_layers)  # OpenCLIP's names -> CLIPTextModelWithProjection's
    theirs_g = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
                for k, v in theirs_g.items() if not k.endswith("position_ids")}
    assert set(split) == set(theirs_g) and all(torch.equal(split[k], theirs_g[k]) for k in split)


def test_a_recipe_level_sdxl_lacks_is_one_line(xl_dir):
    sd = load_sd(xl_dir)
    with pytest.raises(UserError, match=r"recipe level_weights names level\(s\) \[1, 8\], but SDXL \(128²\) has "
                                        r"cross-attention at levels \[2, 4\] only"):
        Segmenter(sd, level_weights={8: 0.3, 4: 0.5, 2: 0.1, 1: 0.1})
    with pytest.raises(UserError, match=r"self_levels names level\(s\) \[1\]"):
        Segmenter(sd, self_levels=(1,))


# ---- bad folders: one line each -------------------------------------------------------------------------

def test_an_sdxl_unet_without_its_second_tower_is_refused(xl_dir, tmp_path):
    folder = shutil.copytree(xl_dir, tmp_path / "one-tower")
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(UserError, match=r"one-tower: the U-Net is SDXL's .* there is no text_encoder_2/"):
        load_sd(folder)


def test_an_sdxl_unet_with_another_models_text_tower_is_refused(xl_dir, tiny_sd_dir, tmp_path):
    from tiny_sd2 import write_tiny_sd2_diffusers

    sd2 = write_tiny_sd2_diffusers(tmp_path / "sd2")  # a 48-wide text tower
    folder = shutil.copytree(xl_dir, tmp_path / "mixed")
    shutil.rmtree(folder / "text_encoder_2")
    shutil.copytree(sd2 / "text_encoder", folder / "text_encoder_2")
    with pytest.raises(UserError, match=r"mixed: context width mismatch: the U-Net's cross-attention reads 64-wide "
                                        r"text .* give 32 \(text_encoder\) \+ 48 \(text_encoder_2\)"):
        load_sd(folder)
    pooled = shutil.copytree(xl_dir, tmp_path / "pooled")
    tower = randomise_(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **{**TEXT_G, "projection_dim": 16})), seed=5)
    shutil.rmtree(pooled / "text_encoder_2")
    tower.save_pretrained(pooled / "text_encoder_2")
    with pytest.raises(UserError, match=r"pooled: pooled width mismatch: the U-Net's added embedding takes 32-wide "
                                        r"pooled text \(SDXL: 1280\) but text_encoder_2 projects to 16"):
        load_sd(pooled)


def test_bad_sdxl_single_files(xl_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(xl_file)
    with safe_open(str(xl_file), "pt") as f:
        metadata = f.metadata()
    one_tower = tmp_path / "one-tower.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("conditioner.embedders.1.")}, one_tower, metadata)
    with pytest.raises(UserError, match=r"one-tower\.safetensors: unknown checkpoint layout: no second text encoder "
                                        r"\(conditioner\.embedders\.1\.model\.…\) tensors, so not an SDXL single file"):
        load_sd(one_tower, tokenizer=xl_file.parent / "tokenizer")
    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.ln_final.weight": torch.ones(3), **tensors}, refiner, metadata)
    with pytest.raises(UserError, match=r"refiner\.safetensors: an SDXL refiner"):
        load_sd(refiner)


# ---- the commands ---------------------------------------------------------------------------------------

def test_segment_names_the_model_and_inspect_weights_knows_both_layouts(xl_dir, xl_file, tmp_path, capsys):
    from minidiffseg.cli import main

    image = sample_image_paths()[1]
    assert main(["segment", str(image), "--classes", "cat,sofa", "--weights", str(xl_dir), "--out",
                 str(tmp_path / "out"), "--device", "cpu", "--dtype", "fp32"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == f"SDXL (128²) at 128²: 1 image(s) segmented into {tmp_path / 'out'}"
    assert (tmp_path / "out" / f"{image.stem}_scores.safetensors").is_file()
    assert main(["maps", str(image), "--classes", "cat", "--weights", str(xl_dir), "--out", str(tmp_path / "m.png"),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out  # SDXL's 2 levels of its 17 tiny cross-attention layers, one column each
    assert "17 cross-attention layers, 2 levels" in out and "; SDXL (128²) at 128²" in out, out
    assert main(["inspect-weights", str(xl_dir)]) == 0
    out = capsys.readouterr().out
    assert "diffusers SDXL (128²) folder" in out and "second text encoder" in out and "OK:" in out, out
    assert main(["inspect-weights", str(xl_file)]) == 0
    out = capsys.readouterr().out
    assert "LDM single file (original layout): SDXL (128²)" in out and "second text encoder" in out, out


def test_explore_runs_on_sdxl(xl_dir):
    from minidiffseg.explorer.state import Exploration

    seg = Segmenter.from_pretrained(xl_dir)
    image = sample_image_paths()[1]
    explored = Exploration.run(seg, image, ["cat", "sofa"], seed=3)
    assert torch.equal(explored.result.scores, seg(image, ["cat", "sofa"], seed=3).scores)


def test_hub_knows_the_sdxl_repos():
    assert hub.what_for("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    assert hub.what_for("stabilityai/sdxl-turbo") == "sdxl-turbo"
    for what in ("sdxl", "sdxl-turbo"):
        files = hub.files(what)
        assert "text_encoder_2/model.fp16.safetensors" in files and "tokenizer_2/merges.txt" in files, files
        assert "unet/diffusion_pytorch_model.fp16.safetensors" in files and "scheduler/scheduler_config.json" in files
