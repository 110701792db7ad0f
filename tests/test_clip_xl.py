"""SDXL's two text towers (minidiffseg/sd/clip.py, minidiffseg/sd/openclip.py) against the references on identical
random weights: CLIP ViT-L's penultimate hidden states equal transformers' CLIPTextModel `hidden_states[-2]`;
bigG's (penultimate, pooled) equal transformers' CLIPTextModelWithProjection `hidden_states[-2]` and
`text_embeds`, under both of transformers' EOS rules; SDXL's single-file tower (OpenCLIP's names under
`conditioner.embedders.1.model.`) loads into what diffusers' `convert_open_clip_checkpoint` gives; streamed
runs equal resident ones; the full-size inventories equal transformers' classes built on meta."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from minidiffseg.errors import UserError
from minidiffseg.sd import openclip
from minidiffseg.sd.clip import CLIPTextModel, CLIPTextModelWithProjection, eos_positions
from minidiffseg.sd.config import CLIPTextConfig
from minidiffseg.sd.loading import build_on_meta, load_strict
from minidiffseg.sd.stream import blocks, stream_weights
from parity import errors
from tiny_sd import randomise_, reference_text_config, text_state, transformers
from tiny_sd import diffusers  # noqa: F401  (a skip, or a failure in strict mode, without diffusers)

from diffusers.loaders import single_file_utils as reference  # noqa: E402  (diffusers' single-file converters)

BOS, EOS, BANG = 49406, 49407, 0  # CLIP's special tokens; "!", bigG's tokenizer's padding (BACKBONES.md A2)
# the text config of diffusers' SDXL pipeline test (tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py,
# /work/shared/BACKBONES.md A6; both towers share it there), with CLIP's real vocabulary so that real ids are valid
TINY_XL = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=5,
                         num_attention_heads=4, layer_norm_eps=1e-5, projection_dim=32, hidden_act="gelu",
                         eos_token_id=2)
# SDXL base 1.0's text_encoder/config.json and text_encoder_2/config.json, the fields minidiffseg reads (as public
# copies of the hub files have them: not read from the hub here)
SDXL_TEXT = {"architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu",
             "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
             "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
             "vocab_size": 49408}
SDXL_TEXT_2 = {"architectures": ["CLIPTextModelWithProjection"], "bos_token_id": 0, "eos_token_id": 2,
               "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "layer_norm_eps": 1e-05,
               "max_position_embeddings": 77, "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1,
               "projection_dim": 1280, "vocab_size": 49408}
PREFIX = openclip.SDXL.prefix  # conditioner.embedders.1.model.


def reference_config(cfg: CLIPTextConfig, **ids: int):
    """transformers' CLIPTextConfig at `cfg`, its EOS id (which chooses the pooling rule) included, and
    `ids` (bos_token_id, pad_token_id) where the vocabulary has no room for transformers' defaults."""
    ref = reference_text_config(cfg)
    for name, value in {"eos_token_id": cfg.eos_token_id, **ids}.items():
        setattr(ref, name, value)
    return ref


def reference_pair(cfg: CLIPTextConfig, projection: bool, seed: int = 0, **ids: int):
    """A transformers CLIPTextModel(WithProjection) with every parameter randomised, and ours with its weights."""
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    ref = randomise_(cls(reference_config(cfg, **ids)), seed).eval()
    ours = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    ours.load_state_dict(official_state(ref), strict=True)
    return ref, ours


def official_state(ref) -> dict[str, torch.Tensor]:
    """A transformers text tower's parameters under the official files' names (`text_model.…`, and
    `text_projection.weight` beside it), without the position_ids buffer."""
    if isinstance(ref, transformers.CLIPTextModelWithProjection):
        return {k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    return text_state(ref)


def prompts(pad: int, batch: int = 3) -> torch.Tensor:
    """(B, 77) ids: BOS, 2, 9, 16... random tokens, EOS, then `pad` (EOS: CLIP-L's tokenizer; "!": bigG's)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((batch, 77), pad)
    ids[:, 0] = BOS
    for b in range(batch):
        n = 2 + 7 * b
        ids[b, 1:1 + n] = torch.randint(1, BOS, (n,), generator=g)
        ids[b, 1 + n] = EOS
    return ids


def check(got: torch.Tensor, want: torch.Tensor, what: str, bound: float = 1e-5) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    abs_err, rel_err = errors(got, want)
    assert rel_err <= bound, f"{what}: max abs err {abs_err:.3g}, max rel err {rel_err:.3g}"


def calls(modules) -> list[int]:
    """A counter per module of its forward calls (hooks left on: the modules are the test's own)."""
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])  # SDXL's CLIP-L is QuickGELU; the A6 tiny config GELU
def test_penultimate_equals_transformers_hidden_states(act):
    cfg = replace(TINY_XL, hidden_act=act)
    ref, ours = reference_pair(cfg, projection=False)
    ids = prompts(EOS)
    counts = calls([ours.text_model.encoder.layers[-1], ours.text_model.final_layer_norm])
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        got = ours.penultimate(ids)
        assert counts == [0, 0], "penultimate ran the last layer or the final norm"
        full = ours(ids)
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1  # the embeddings, then each layer's output
    check(got, out.hidden_states[-2], f"penultimate ({act})")  # measured 0
    check(full, out.last_hidden_state, f"last hidden state ({act})")  # forward: unchanged
    assert not torch.allclose(got, out.hidden_states[-1]), "penultimate equals the last layer: the test cannot fail"


@pytest.mark.parametrize("pad", [BANG, EOS], ids=["pad !", "pad EOS"])
@pytest.mark.parametrize("eos_token_id", [2, EOS], ids=["eos 2 (argmax)", "eos 49407"])
def test_with_projection_equals_transformers(pad, eos_token_id):
    cfg = replace(TINY_XL, eos_token_id=eos_token_id, projection_dim=24)  # P != W: a transposed weight would fail
    ref, ours = reference_pair(cfg, projection=True, seed=2)
    ids = prompts(pad)
    counts = calls(list(ours.text_model.encoder.layers) + [ours.text_model.final_layer_norm, ours.text_projection])
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        states, pooled = ours(ids)
    assert counts == [1] * len(counts), f"one pass through the layers: calls {counts}"
    check(states, out.hidden_states[-2], "penultimate")  # measured 0
    check(pooled, out.text_embeds, "pooled")  # measured 0 (the norm of the pooled rows alone: the same values)
    assert pooled.shape == (3, 24) and states.shape == (3, 77, 32)


def test_both_eos_rules_pick_as_transformers():
    """eos_token_id 2 (the SD configs' legacy value): the position of the largest id; another value: the first
    position of that id. On A6's vocabulary (1000 ids, BOS 0, pad 1) with its eos_token_id 2 and with 5, on rows
    where the rules disagree: each pooled output equals transformers' under the same config, and the two differ."""
    rows = torch.tensor([[0, 17, 5, 900, 5, 1, 1, 1], [0, 5, 3, 4, 1, 1, 1, 1], [0, 999, 998, 5, 5, 5, 5, 5]])
    positions = {2: [3, 1, 1], 5: [2, 1, 3]}  # argmax(ids) / first 5
    pooled = {}
    for eos, want in positions.items():
        cfg = replace(TINY_XL, vocab_size=1000, max_position_embeddings=8, eos_token_id=eos)
        assert eos_positions(rows, eos).tolist() == want
        ref, ours = reference_pair(cfg, projection=True, seed=3, bos_token_id=0, pad_token_id=1)  # A6's
        with torch.no_grad():
            pooled[eos] = ours(rows)[1]
            check(pooled[eos], ref(input_ids=rows).text_embeds, f"pooled, eos_token_id {eos}")
    assert not torch.allclose(pooled[2][0], pooled[5][0]), "the rules pooled the same row: the test cannot fail"
    assert CLIPTextConfig.from_transformers(SDXL_TEXT_2).eos_token_id == 2  # SDXL's configs: the argmax rule


def sdxl_file(ref, seed: int = 0) -> dict[str, torch.Tensor]:
    """SDXL's single-file text towers from a reference bigG: OpenCLIP's names under conditioner.embedders.1.model.
    (the inverse of our rules: q/k/v fused, text_projection [W, P]) with `logit_scale`, and a CLIP-L tower beside
    it under conditioner.embedders.0 (HF names), which the bigG rules must leave alone."""
    state = {PREFIX + k: v for k, v in openclip.to_openclip(official_state(ref)).items()}
    state[PREFIX + "logit_scale"] = torch.tensor(4.6052)  # log(100): CLIP's contrastive temperature, unused
    clip_l = "conditioner.embedders.0.transformer.text_model."
    state[clip_l + "embeddings.token_embedding.weight"] = torch.randn(49408, 8, generator=torch.Generator().manual_seed(seed))
    return state


def test_single_file_tower_equals_diffusers_converter(tmp_path):
    cfg = replace(TINY_XL, projection_dim=24)
    ref, _ = reference_pair(cfg, projection=True, seed=4)
    state = sdxl_file(ref)
    path = tmp_path / "sdxl-tiny.safetensors"
    save_file(state, path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert openclip.SDXL.holds(shapes) and not openclip.SD2.holds(shapes)
    inferred = openclip.infer_text_config(shapes, openclip.SDXL)  # heads: no shape tells (64 wide at full size)
    assert replace(inferred, num_attention_heads=cfg.num_attention_heads) == cfg
    layers = openclip.layers_used(shapes, openclip.SDXL)
    ignored = openclip.ignored(shapes, layers, openclip.SDXL)
    assert layers == cfg.num_hidden_layers and ignored == [PREFIX + "logit_scale"]  # every layer, the projection kept
    names = {k: k.removeprefix(PREFIX) for k in shapes if k.startswith(PREFIX) and k not in ignored}
    holder = load_strict(build_on_meta(openclip.OpenCLIPTextWeightsWithProjection, cfg), path, names,
                         torch.float32, torch.device("cpu"), "second text encoder")
    ours = openclip.to_clip_text_with_projection(holder)
    assert isinstance(ours, CLIPTextModelWithProjection)
    with torch.device("meta"):
        meta = transformers.CLIPTextModelWithProjection(reference_config(cfg))
    theirs = reference.convert_open_clip_checkpoint(meta, state, prefix=PREFIX)
    got = ours.state_dict()
    assert got.keys() == theirs.keys(), f"missing {sorted(theirs.keys() - got.keys())}, extra {sorted(got.keys() - theirs.keys())}"
    for k, t in theirs.items():
        assert torch.equal(got[k], t), f"{k}: max abs {(got[k] - t).abs().max():.3e}"
    # q/k/v are views of the loaded tensors (row blocks of in_proj_weight); the projection is its transpose copied
    # into a Linear weight's layout, so that the pooled embedding has the folder's bits (openclip.from_openclip)
    weight = ours.text_projection.weight
    assert weight.is_contiguous() and torch.equal(weight, holder.text_projection.t())
    q = ours.text_model.encoder.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == holder.transformer.resblocks[0].attn.in_proj_weight.data_ptr()
    ids = prompts(BANG)
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        states, pooled = ours(ids)
    check(states, out.hidden_states[-2], "penultimate, from the single file")
    check(pooled, out.text_embeds, "pooled, from the single file")
    # SD2's layout is unchanged: the last resblock and text_projection are ignored there
    sd2 = {openclip.PREFIX + k.removeprefix(PREFIX): s for k, s in shapes.items() if k.startswith(PREFIX)}
    assert openclip.layers_used(sd2) == cfg.num_hidden_layers - 1
    assert openclip.PREFIX + "text_projection" in openclip.ignored(sd2, cfg.num_hidden_layers - 1)
    weights = openclip.OpenCLIPTextWeightsWithProjection(cfg)
    weights.weights = object()  # what a streaming loader would attach: the split needs the tensors themselves
    with pytest.raises(UserError, match="second text encoder of an SDXL single file cannot be streamed"):
        openclip.to_clip_text_with_projection(weights)


def official_file(ref, path) -> tuple[dict[str, str], object]:
    """`ref` saved as the official text_encoder(_2)/model.safetensors is (position_ids included); {key: name}."""
    state = {k: v.contiguous() for k, v in official_state(ref).items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, path)
    return {k: k for k in state if not k.endswith("position_ids")}, path


@pytest.mark.parametrize("projection", [False, True], ids=["CLIP-L penultimate", "bigG"])
def test_streamed_equals_resident(tmp_path, projection):
    """Read block by block from the official file (sd/stream.py): bit-identical outputs, each block fetched once
    (CLIP-L's penultimate fetches neither its last layer nor the final norm)."""
    ref, _ = reference_pair(TINY_XL, projection=projection, seed=5)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    names, path = official_file(ref, tmp_path / "model.safetensors")
    cpu = torch.device("cpu")
    resident = load_strict(build_on_meta(cls, TINY_XL), path, names, torch.float32, cpu, "text encoder")
    streamed = stream_weights(build_on_meta(cls, TINY_XL), path, names, torch.float32, cpu, "text encoder")
    found = blocks(streamed)
    owned = [n for m in found for n, _ in m.named_parameters()]
    assert len(owned) == len(names), "the blocks do not hold every parameter exactly once"
    fetched: list = []
    read = streamed.weights.read  # type: ignore[union-attr]
    streamed.weights.read = lambda module: fetched.append(module) or read(module)  # type: ignore[union-attr]
    run = (lambda m, ids: m(ids)) if projection else (lambda m, ids: (m.penultimate(ids),))
    ids = prompts(BANG if projection else EOS)
    with torch.no_grad():
        want, got = run(resident, ids), run(streamed, ids)
    for w, g in zip(want, got):
        assert torch.equal(w, g), f"streamed vs resident: max abs {(w - g).abs().max():.3g}"
    layers = streamed.text_model.encoder.layers
    skipped = [] if projection else [layers[-1], streamed.text_model.final_layer_norm]
    assert fetched == [m for m in found if m not in skipped]


def test_full_size_inventories_equal_transformers_on_meta():
    """SDXL's CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 towers built from their config.json files, name by name
    against transformers' classes built on meta from the same configs; bigG's single-file layout (32 resblocks,
    text_projection [1280, 1280], logit_scale) gives back its config and, through our rules, diffusers' names."""
    cfg_l, cfg_g = CLIPTextConfig.from_transformers(SDXL_TEXT), CLIPTextConfig.from_transformers(SDXL_TEXT_2)
    with torch.device("meta"):
        ref_l, ours_l = transformers.CLIPTextModel(reference_config(cfg_l)), CLIPTextModel(cfg_l)
        ref_g, ours_g = transformers.CLIPTextModelWithProjection(reference_config(cfg_g)), CLIPTextModelWithProjection(cfg_g)
        holder = openclip.OpenCLIPTextWeightsWithProjection(cfg_g)
    for what, ref, ours in (("CLIP-L", ref_l, ours_l), ("bigG", ref_g, ours_g)):
        want = {k: tuple(v.shape) for k, v in official_state(ref).items()}
        got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert got == want, f"{what}: missing {sorted(want.keys() - got.keys())[:3]}, extra {sorted(got.keys() - want.keys())[:3]}"
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours_l) == count(ref_l) == 123_060_480  # SD1.5's text tower: the same ViT-L/14
    assert count(ours_g) == count(ref_g) == count(holder) == 694_659_840  # 32 layers + the 1280² projection
    assert ours_g.text_projection.weight.shape == (1280, 1280) and ours_g.text_model.encoder.layers[0].mlp.act == "gelu"
    file = {PREFIX + k: v for k, v in openclip.to_openclip(official_state(ref_g)).items()}
    file[PREFIX + "logit_scale"] = torch.empty((), device="meta")
    shapes = {k: tuple(v.shape) for k, v in file.items()}
    assert len(shapes) == 2 + 2 + 32 * 12 + 2 and shapes[PREFIX + "text_projection"] == (1280, 1280)
    assert openclip.infer_text_config(shapes, openclip.SDXL) == cfg_g
    theirs = reference.convert_open_clip_checkpoint(ref_g, file, prefix=PREFIX)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours_g.state_dict().items()}
