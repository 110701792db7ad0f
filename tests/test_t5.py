"""SD3's T5 encoder and tokenizer (minidiffseg/sd3/t5.py, t5_tokenizer.py) against transformers on identical random
weights and the same tokenizer.json: last hidden states as diffusers' SD3 pipeline calls the encoder (padded rows,
no mask) in float64/float32 for the ReLU and gated-GELU feed-forwards; float16 as transformers' from_pretrained runs
it (wo kept float32) and as a plain `.half()` model runs it (the inf clamp); strict loading of save_pretrained's file
through the project's loader, whichever name the tied embedding is stored under; streaming bit-equal to resident;
the XXL inventory on meta; the tokenizer's rows, pieces and word positions."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidiffseg.errors import UserError
from minidiffseg.sd.loading import build_on_meta, load_strict, read_header
from minidiffseg.sd.stream import blocks, stream_weights
from minidiffseg.sd3.t5 import T5Block, T5Config, T5Encoder, checkpoint_names, relative_position_bucket
from minidiffseg.sd3.t5_tokenizer import T5Tokenizer
from parity import errors
from tiny_t5 import (TINY, TINY_GATED, prompt_ids, reference_config, reference_encoder, transformers,
                     write_text_encoder_3, write_tokenizer_3)

CPU = torch.device("cpu")
CONFIGS = {"relu": TINY, "gated-gelu": TINY_GATED}
# google/t5-v1_1-xxl's config.json, which SD3's text_encoder_3/config.json copies (the fields read; as public copies
# of the hub file have them, not read from the hub here)
XXL_CONFIG = {"architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "dense_act_fn": "gelu_new",
              "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True,
              "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 24,
              "num_heads": 64, "num_layers": 24, "pad_token_id": 0, "relative_attention_max_distance": 128,
              "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "vocab_size": 32128}
XXL_PARAMETERS = 4_762_310_656  # 32128·4096 + 24·(4·4096² + 3·4096·10240 + 2·4096) + 32·64 + 4096


def check(got: torch.Tensor, want: torch.Tensor, what: str, bound: float) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    abs_err, rel_err = errors(got, want)
    print(f"{what}: max abs err {abs_err:.3g}, max rel err {rel_err:.3g}")
    assert rel_err <= bound, f"{what}: max abs err {abs_err:.3g}, max rel err {rel_err:.3g}"


def ours_from(ref, cfg: T5Config) -> T5Encoder:
    """Our encoder with the reference's weights (state_dict's `encoder.embed_tokens.weight` is `shared.weight`)."""
    ours = T5Encoder(cfg).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}, strict=True)
    return ours


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """text_encoder_3/ for each feed-forward, saved in float32 and in float16."""
    root = tmp_path_factory.mktemp("t5")
    made = {}
    for ff, cfg in CONFIGS.items():
        for dtype in (torch.float32, torch.float16):
            made[(ff, dtype)] = folder = root / f"{ff}-{str(dtype).removeprefix('torch.')}"
            write_text_encoder_3(folder, cfg, seed=3, dtype=dtype)
    return made


# ---- the network ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("ff", list(CONFIGS))
def test_last_hidden_state_equals_transformers(ff, dtype):
    """Rows of 256 as SD3 feeds them (EOS, padding, one full row), without a mask: transformers' last_hidden_state."""
    cfg = CONFIGS[ff]
    ref = reference_encoder(cfg, seed=0).to(dtype)
    ours = ours_from(ref, cfg).to(dtype)
    ids = prompt_ids()
    with torch.no_grad():
        want, got = ref(input_ids=ids).last_hidden_state, ours(ids)
    # measured: relu 0 in both dtypes; gated-gelu fp64 3e-15 abs, fp32 ~4e-7 rel (torch's tanh-GELU kernel vs
    # transformers' gelu_new formula: the same function, rounded differently)
    check(got, want, f"{ff} {dtype}", 1e-12 if dtype == torch.float64 else 1e-5)
    assert got.dtype == dtype and got.std() > 0.1


def test_relative_position_buckets_equal_transformers():
    """The bucket of every distance -300..300 under XXL's (32, 128) and the tiny (8, 128) settings."""
    relative = torch.arange(-300, 301)[None, :]
    for buckets, distance in ((32, 128), (8, 128), (32, 20)):
        want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            relative, bidirectional=True, num_buckets=buckets, max_distance=distance)
        assert torch.equal(relative_position_bucket(relative, buckets, distance), want), (buckets, distance)


@pytest.mark.parametrize("ff", list(CONFIGS))
def test_half_precision_as_transformers_from_pretrained(folders, ff):
    """float16 as SD3 loads T5 (from_pretrained(torch_dtype=float16): wo kept float32, so the residual stream turns
    float32 after block 0's feed-forward) and bfloat16 (no such exception): ReLU bit-equal; gated-GELU within the
    rounding of the two GELU kernels, and as close to the float64 result as transformers is."""
    path = folders[(ff, torch.float16)]
    ids = prompt_ids(length=96)
    names = checkpoint_names(read_header(path / "model.safetensors")[0])
    with torch.no_grad():
        exact = transformers.T5EncoderModel.from_pretrained(path, dtype=torch.float64).eval()(input_ids=ids)[0]
        for dtype in (torch.float16, torch.bfloat16):
            ref = transformers.T5EncoderModel.from_pretrained(path, dtype=dtype).eval()
            wo = ref.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
            assert wo == (torch.float32 if dtype == torch.float16 else dtype), "transformers' keep-in-fp32 rule changed"
            ours = load_strict(build_on_meta(T5Encoder, CONFIGS[ff]), path / "model.safetensors", names, dtype, CPU, "T5")
            want, got = ref(input_ids=ids)[0], ours(ids)
            assert got.dtype == want.dtype == dtype
            if ff == "relu":
                assert torch.equal(got, want), f"{ff} {dtype}: max abs {(got - want).abs().max():.3g}"
            else:
                # measured: float16 1.9e-3, bfloat16 2.2e-2 (8 bits of mantissa), both as far from float64 as
                # transformers' own result (below)
                check(got, want, f"{ff} {dtype} vs transformers", 1e-2 if dtype == torch.float16 else 5e-2)
                ours_err, ref_err = errors(got, exact)[1], errors(want, exact)[1]
                print(f"{ff} {dtype} vs float64: ours {ours_err:.3g}, transformers {ref_err:.3g}")
                assert ours_err <= 1.5 * ref_err


def test_float16_clamp_as_transformers():
    """A model cast with .half() (wo float16 too; keep_wo_float32=False) whose feed-forwards overflow float16: wo's
    first row all 6000 on relu outputs (≥ 0) gives inf in channel 0. Each block clamps it to 64504 as transformers'
    T5Block does, and the whole encoder stays finite and equal to transformers'."""
    cfg = replace(TINY, keep_wo_float32=False)
    ref = reference_encoder(cfg, seed=5)
    with torch.no_grad():
        for block in ref.encoder.block:
            block.layer[1].DenseReluDense.wo.weight[0] = 6000.0
    ours = ours_from(ref, cfg)
    ref, ours = ref.half(), ours.half()
    ids = prompt_ids(length=64)
    first = ours.encoder.block[0]
    with torch.no_grad():
        x = ours.shared(ids)
        attended = first.layer[0](x, first.layer[0].SelfAttention.position_bias(ids.shape[1], CPU))
        overflow = first.layer[1](attended)
        block, _ = first(x)
        ref_block = ref.encoder.block[0](ref.shared(ids))[0]
        want, got = ref(input_ids=ids)[0], ours(ids)
    assert torch.isinf(overflow).any(), "the test input does not overflow: the clamp is not exercised"
    assert torch.isfinite(block).all() and block.abs().max() == 64504
    assert torch.equal(block, ref_block)
    assert torch.isfinite(got).all() and torch.equal(got, want), f"max abs {(got - want).abs().max():.3g}"


# ---- loading and streaming ------------------------------------------------------------------------------------------

def test_strict_loading_of_save_pretrained_file(folders, tmp_path):
    """transformers 5's save_pretrained stores the tied embedding once, as shared.weight; a file holding only
    encoder.embed_tokens.weight, or both (different: transformers then unties them and the encoder reads
    encoder.embed_tokens), or a whole T5ForConditionalGeneration's decoder beside it, loads as transformers
    loads it."""
    path = folders[("gated-gelu", torch.float32)] / "model.safetensors"
    keys = set(read_header(path)[0])
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys  # what transformers 5 writes
    state = load_file(path)
    ids = prompt_ids(length=64)
    other = torch.randn(state["shared.weight"].shape, generator=torch.Generator().manual_seed(9))
    variants = {
        "as saved": state,
        "embed_tokens only": {**{k: v for k, v in state.items() if k != "shared.weight"},
                              "encoder.embed_tokens.weight": state["shared.weight"]},
        "both, different": {**state, "encoder.embed_tokens.weight": other},
        "with a decoder": {**state, "decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(32, 32),
                           "decoder.final_layer_norm.weight": torch.ones(32), "lm_head.weight": other},
    }
    for what, tensors in variants.items():
        folder = tmp_path / what.replace(" ", "_").replace(",", "")
        folder.mkdir()
        (folder / "config.json").write_text((path.parent / "config.json").read_text())
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        names = checkpoint_names(read_header(folder / "model.safetensors")[0])
        ours = load_strict(build_on_meta(T5Encoder, TINY_GATED), folder / "model.safetensors", names, torch.float32,
                           CPU, "T5 text encoder")
        ref = transformers.T5EncoderModel.from_pretrained(folder).eval()
        with torch.no_grad():
            check(ours(ids), ref(input_ids=ids)[0], f"loaded ({what})", 1e-5)
    broken = {k: v for k, v in state.items() if not k.startswith("encoder.block.2.")}
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(UserError, match="tensor.*missing: encoder.block.2.layer"):
        load_strict(build_on_meta(T5Encoder, TINY_GATED), tmp_path / "broken.safetensors",
                    checkpoint_names(broken), torch.float32, CPU, "T5 text encoder")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_equals_resident(folders, dtype):
    """Read block by block from the file (sd/stream.py): bit-identical to resident; the position bias computed in
    block 0 outlives its weights; every parameter fetched once, in module order."""
    path = folders[("gated-gelu", torch.float32)] / "model.safetensors"
    names = checkpoint_names(read_header(path)[0])
    resident = load_strict(build_on_meta(T5Encoder, TINY_GATED), path, names, dtype, CPU, "T5 text encoder")
    streamed = stream_weights(build_on_meta(T5Encoder, TINY_GATED), path, names, dtype, CPU, "T5 text encoder")
    found = blocks(streamed)
    assert [type(m).__name__ for m in found] == ["Embedding"] + ["T5Block"] * TINY_GATED.num_layers + ["T5LayerNorm"]
    assert sum(len(list(m.parameters())) for m in found) == len(names), "the blocks do not hold every parameter once"
    fetched: list = []
    read = streamed.weights.read  # type: ignore[union-attr]
    streamed.weights.read = lambda module: fetched.append(module) or read(module)  # type: ignore[union-attr]
    ids = prompt_ids(length=64)
    with torch.no_grad():
        want, got = resident(ids), streamed(ids)
    assert torch.equal(want, got), f"streamed vs resident: max abs {(want - got).abs().max():.3g}"
    assert fetched == found
    assert all(p.untyped_storage().nbytes() <= 8 for p in streamed.parameters()), "weights left resident after a pass"


def test_full_size_inventory_equals_transformers_on_meta():
    """T5 v1.1 XXL's encoder from its config.json, name by name against transformers' T5EncoderModel built on meta.
    transformers' state_dict lists the embedding twice (shared and its tied alias encoder.embed_tokens); its
    parameters, once."""
    cfg = T5Config.from_transformers(XXL_CONFIG)
    assert cfg == T5Config.xxl()
    with torch.device("meta"):
        ref, ours = transformers.T5EncoderModel(reference_config(cfg)), T5Encoder(cfg)
    want = {k: tuple(v.shape) for k, v in ref.named_parameters()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want, f"missing {sorted(want.keys() - got.keys())[:3]}, extra {sorted(got.keys() - want.keys())[:3]}"
    assert set(ref.state_dict()) - set(got) == {"encoder.embed_tokens.weight"}
    count = sum(p.numel() for p in ours.parameters())
    print(f"T5 v1.1 XXL encoder: {count:,} parameters")
    assert count == sum(p.numel() for p in ref.parameters()) == XXL_PARAMETERS
    # a file with both names (transformers' state_dict, a converted .bin): encoder.embed_tokens is the one loaded
    assert checkpoint_names(ref.state_dict()) == {**{k: k for k in got if k != "shared.weight"},
                                                  "encoder.embed_tokens.weight": "shared.weight"}
    assert isinstance(ours.encoder.block[23], T5Block) and not hasattr(ours.encoder.block[1].layer[0].SelfAttention,
                                                                         "relative_attention_bias")


def test_config_from_transformers(folders):
    """Our config back from save_pretrained's config.json; feed-forwards other than relu / gated-gelu refused."""
    for ff, cfg in CONFIGS.items():
        saved = json.loads((folders[(ff, torch.float32)] / "config.json").read_text())
        assert T5Config.from_transformers(saved) == cfg
    with pytest.raises(UserError, match="feed_forward_proj 'gated-silu' is not implemented"):
        T5Config.from_transformers({**XXL_CONFIG, "feed_forward_proj": "gated-silu"})


# ---- the tokenizer --------------------------------------------------------------------------------------------------

PROMPTS = [
    "a photograph of a cat sleeping",
    "A photograph of a Cat.",
    "a  cat\u00a0on\u3000the sofa",  # runs of spaces, no-break and ideographic spaces
    "\ufb01re hydrant at night\u2026",  # ligature, ellipsis: the Precompiled map
    "café über Straße, très ½ Ａ 日本語の猫 🐱",  # accents, CJK, an unknown character (<unk>)
    "cafe\u0301",  # a combining accent, composed by the map
    "<extra_id_0> cat </s> dog",  # T5's special tokens written out
    " ".join(["a photograph of a dog"] * 60),  # 300 pieces: truncated to 255 + EOS
    "",
]


@pytest.fixture(scope="module", params=[False, True], ids=["tokenizers' format", "2020 hub format"])
def tokenizer_dir(request, tmp_path_factory):
    return write_tokenizer_3(tmp_path_factory.mktemp("tokenizer_3"), legacy=request.param)


def test_rows_equal_transformers(tokenizer_dir):
    """Our rows equal T5TokenizerFast's as SD3 calls it (padding="max_length", max_length=256, truncation=True), from
    the folder (from_pretrained) and from the file (tokenizer_file=); at another max_length too."""
    ours = T5Tokenizer.from_dir(tokenizer_dir)
    refs = [transformers.T5TokenizerFast.from_pretrained(str(tokenizer_dir)),
            transformers.T5TokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))]
    for max_length in (256, 77):
        ours.max_length = max_length
        got = ours(PROMPTS)
        assert got.shape == (len(PROMPTS), max_length) and got.dtype == torch.int64
        for ref in refs:
            want = ref(PROMPTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
            differ = [p for p, g, w in zip(PROMPTS, got, want.input_ids) if not torch.equal(g, w)]
            assert not differ, f"rows differ from transformers' for {differ}"
    for text in PROMPTS:
        assert ours.encode(text) == refs[0](text, add_special_tokens=False).input_ids, text
    assert ours.tokens(PROMPTS[0]) == ["▁a", "▁photograph", "▁of", "▁a", "▁cat", "▁sleep", "ing"]
    assert ours.tokens(PROMPTS[3])[:2] == ["▁fire", "▁hydrant"]  # ﬁ -> fi by the file's character map
    row = ours(PROMPTS[7])[0]
    assert row[-1] == 1 and (row != 0).all()  # truncated: 76 pieces, then EOS
    assert ours(PROMPTS[-1])[0].tolist() == [1] + [0] * 76  # an empty prompt: EOS, padding


def test_word_positions(tmp_path):
    tok = T5Tokenizer.from_dir(write_tokenizer_3(tmp_path))
    assert tok.word_positions("a photograph of a cat", "cat") == [4]
    assert tok.word_positions("a photograph of a cat sleeping", "sleeping") == [5, 6]  # ▁sleep ing
    assert tok.word_positions("a photograph of a fire hydrant.", "fire hydrant") == [4, 5]
    assert tok.word_positions("a photograph of a \ufb01re hydrant", "fire hydrant") == [4, 5]  # normalised alike
    assert tok.word_positions("a cat and a cat's bowl", "cat") == [4]  # the last occurrence; "'s" ends the word
    assert tok.word_positions("a photograph of a cat, sleeping", "cat") == [4]
    for prompt in ("a photograph of cats", "a photograph of a Cat", "a photograph of a dog"):
        with pytest.raises(UserError, match="does not occur in the prompt"):
            tok.word_positions(prompt, "cat")
    long = " ".join(["a photograph of a dog"] * 60) + " and a cat"
    with pytest.raises(UserError, match="only after T5 token 255"):
        tok.word_positions(long, "cat")
    with pytest.raises(UserError, match="has no T5 tokens"):
        tok.word_positions("a cat", " ")


def test_tokenizer_files_checked(tmp_path):
    """A missing, malformed or non-T5 tokenizer.json is one UserError line naming the file; model_max_length is
    read from tokenizer_config.json and bounds max_length."""
    with pytest.raises(UserError, match=r"tokenizer.json not found.*download") as info:
        T5Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"tokenizer.json: not a readable tokenizer.json.*download"):
        T5Tokenizer.from_dir(tmp_path)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    Tokenizer(WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="a WordLevel tokenizer, not T5's"):
        T5Tokenizer.from_dir(tmp_path)
    folder = write_tokenizer_3(tmp_path / "t", model_max_length=300)
    tok = T5Tokenizer.from_dir(folder)
    assert tok.model_max_length == 300 and tok.max_length == 256
    with pytest.raises(UserError, match="between 2 and 300"):
        tok.max_length = 301
    assert T5Tokenizer.from_dir(write_tokenizer_3(tmp_path / "u", model_max_length=None)).model_max_length == 512
    (folder / "tokenizer_config.json").write_text("[")
    with pytest.raises(UserError, match="tokenizer_config.json: not valid JSON"):
        T5Tokenizer.from_dir(folder)


def test_encoder_on_tokenizer_rows(tokenizer_dir, folders):
    """End to end as SD3's pipeline: tokenizer rows into the encoder, ours and transformers' (float32)."""
    rows = T5Tokenizer.from_dir(tokenizer_dir)(PROMPTS[:4])
    path = folders[("gated-gelu", torch.float32)]
    ours = load_strict(build_on_meta(T5Encoder, TINY_GATED), path / "model.safetensors",
                       checkpoint_names(read_header(path / "model.safetensors")[0]), torch.float32, CPU, "T5")
    ref = transformers.T5EncoderModel.from_pretrained(path).eval()
    with torch.no_grad():
        check(ours(rows), ref(input_ids=rows)[0], "tokenizer rows", 1e-5)
