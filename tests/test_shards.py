"""Sharded safetensors checkpoints (minidiffseg/sd/shards.py): a shard set and its index read as the one file it
was split from — the same header, the same Report, bit-equal tensors through load_strict, upcast_weights and
stream_weights — with one line naming the shard at fault for each way a set can be broken. Sets are written by
transformers' and diffusers' own `save_pretrained(max_shard_size=...)` (the real names and index format) and by
hand with safetensors (tensors spread round-robin over the shards, so reads jump between them)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import minidiffseg.sd.loading as loading
import tiny_sd
from minidiffseg.errors import UserError
from minidiffseg.sd.checkpoint import _text_name
from minidiffseg.sd.clip import CLIPTextModel
from minidiffseg.sd.config import CLIPTextConfig
from minidiffseg.sd.loading import ShardedLayout, build_on_meta, check, load_strict, read_header, read_layout
from minidiffseg.sd.names import not_built
from minidiffseg.sd.checkpoint import weights_file
from minidiffseg.sd.shards import index_names, is_index, read_index, shard_files
from minidiffseg.sd.stream import ARENA, StreamedWeights, blocks, stream_weights, upcast_weights, weights_of
from minidiffseg.sd.weightfile import ShardedWeightFile, WeightFile, open_weights

CPU = torch.device("cpu")
WHAT = "text encoder"


# ---- checkpoints ---------------------------------------------------------------------------------------

def clip_text(seed: int = 7):
    """A random transformers CLIPTextModel at the tiny config (6.4 MB in fp32)."""
    cfg = tiny_sd.reference_text_config(CLIPTextConfig.tiny())
    return tiny_sd.randomise_(tiny_sd.transformers.CLIPTextModel(cfg), seed)


def tensors_of(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def split(src: Path, dst: Path, parts: int = 3, variant: str | None = None) -> Path:
    """`src`'s tensors round-robin over `parts` shards named as transformers names them, with the index; returns
    the index. Each shard keeps `src`'s metadata, as save_pretrained's shards all carry {"format": "pt"}."""
    tensors, metadata = tensors_of(src)
    stem = src.name.removesuffix(".safetensors").removesuffix(f".{variant}")
    infix = f".{variant}" if variant else ""
    names = [f"{stem}{infix}-{i + 1:05d}-of-{parts:05d}.safetensors" for i in range(parts)]
    weight_map = {k: names[i % parts] for i, k in enumerate(tensors)}
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        save_file({k: t for k, t in tensors.items() if weight_map[k] == name}, dst / name, metadata=metadata)
    index = dst / index_names(stem, variant)[0]
    index.write_text(json.dumps({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                                 "weight_map": weight_map}, indent=2))
    return index


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """One CLIP text tower written five ways: whole (fp32 and fp16), by transformers in shards (fp32 and the fp16
    variant: the real names and index), and by hand in three shards (fp32 and fp16 variant)."""
    root = tmp_path_factory.mktemp("shards")
    clip_text().save_pretrained(root / "whole")
    clip_text().half().save_pretrained(root / "whole", variant="fp16")
    clip_text().save_pretrained(root / "hf", max_shard_size="2MB")
    clip_text().half().save_pretrained(root / "hf", max_shard_size="2MB", variant="fp16")
    whole, whole16 = root / "whole" / "model.safetensors", root / "whole" / "model.fp16.safetensors"
    return {"whole": whole, "whole fp16": whole16,
            "hf": root / "hf" / "model.safetensors.index.json",
            "hf fp16": root / "hf" / "model.safetensors.index.fp16.json",
            "split": split(whole, root / "split"), "split fp16": split(whole16, root / "split16", variant="fp16")}


SHARDED = ["hf", "split"]


def names_of(path: Path) -> dict[str, str]:
    """File key -> parameter name, as sd/checkpoint.py builds it for text_encoder/."""
    shapes, _ = read_header(path)
    names = {k: _text_name(k, s) for k, s in shapes.items()}
    return {k: n for k, n in names.items() if not not_built("text_encoder", n)}


def module() -> CLIPTextModel:
    return build_on_meta(CLIPTextModel, CLIPTextConfig.tiny())


def load(path: Path, dtype=torch.float32) -> CLIPTextModel:
    return load_strict(module(), path, names_of(path), dtype, CPU, WHAT)


def ids() -> torch.Tensor:
    return torch.randint(0, CLIPTextConfig.tiny().vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))


def params(net) -> dict[str, torch.Tensor]:
    return dict(net.state_dict())


def assert_equal_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and torch.equal(pa[k], pb[k]), k


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, UserError)
    return message


# ---- the real layouts ----------------------------------------------------------------------------------

def test_transformers_and_diffusers_names(text, tmp_path):
    """What save_pretrained writes is what shards.py expects: transformers' shards and index, with and without the
    fp16 variant, and diffusers' (`diffusion_pytorch_model.fp16-0000N-of-0000M.safetensors` + index)."""
    hf = text["hf"].parent
    names = sorted(p.name for p in hf.glob("*.safetensors*"))
    fp32 = [n for n in names if re.fullmatch(r"model-(\d{5})-of-(\d{5})\.safetensors", n)]
    fp16 = [n for n in names if re.fullmatch(r"model\.fp16-(\d{5})-of-(\d{5})\.safetensors", n)]
    assert len(fp32) > 1 and len(fp16) > 1, names
    assert sorted(set(names) - set(fp32) - set(fp16)) == ["model.safetensors.index.fp16.json",
                                                           "model.safetensors.index.json"], names
    index = json.loads(text["hf"].read_text())
    assert set(index) == {"metadata", "weight_map"} and index["metadata"]["total_size"] > 0
    assert [p.name for p in shard_files(text["hf"])] == fp32 and [p.name for p in shard_files(text["hf fp16"])] == fp16
    assert weights_file(hf, "model", None) == text["hf"] and weights_file(hf, "model", "fp16") == text["hf fp16"]
    assert shard_files(text["whole"]) == [text["whole"]]
    _, vae, _ = tiny_sd.tiny_reference(0)
    vae.half().save_pretrained(tmp_path / "vae", max_shard_size="200KB", variant="fp16")
    found = weights_file(tmp_path / "vae", "diffusion_pytorch_model", "fp16")
    assert found.name == "diffusion_pytorch_model.safetensors.index.fp16.json" and is_index(found)
    assert all(re.fullmatch(r"diffusion_pytorch_model\.fp16-\d{5}-of-\d{5}\.safetensors", p.name)
               for p in shard_files(found)) and len(shard_files(found)) > 2
    shapes, _ = read_header(found)  # every shard checked, the index against them
    assert shapes.keys() == vae.state_dict().keys()
    for name in ("model.safetensors.index.json", "model.safetensors.index.fp16.json", "x.safetensors.fp16.index.json"):
        assert is_index(Path("a") / name)
    assert not any(is_index(n) for n in ("model.safetensors", "config.json", "pytorch_model.bin.index.json"))


@pytest.mark.parametrize("kind", SHARDED)
def test_header_layout_and_report_equal_the_whole_file(text, kind):
    for suffix in ("", " fp16"):
        whole, sharded = text["whole" + suffix], text[kind + suffix]
        (shapes, metadata), (shapes_s, metadata_s) = read_header(whole), read_header(sharded)
        assert shapes == shapes_s and metadata == metadata_s == {"format": "pt"}
        layout = read_layout(sharded)
        assert isinstance(layout, ShardedLayout) and layout.index == sharded
        assert layout.size == sum(f.stat().st_size for f in shard_files(sharded))
        assert set(layout.file_of.values()) == set(shard_files(sharded)) and layout.file_of.keys() == shapes.keys()
        for key, (dtype, begin, end) in layout.spans.items():  # offsets in the key's own shard
            assert layout.shards[layout.file_of[key]].spans[key] == (dtype, begin, end)
        a, b = check(module(), whole, names_of(whole)), check(module(), sharded, names_of(sharded))
        assert a == b and a.ok and a.params == sum(p.numel() for p in clip_text().parameters())


# ---- the same tensors, bit for bit -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SHARDED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_load_strict_is_bit_equal(text, kind, dtype, monkeypatch):
    """load_strict of a set equals that of the whole file, from the fp32 and the fp16 files, also with the
    mappings reopened after every tensor (RELEASE_BYTES = 0: the handles of all shards let go and reopened).
    (Outputs are compared within rounding only: a tensor mapped from a file starts at its offset there, and on
    some CPUs the BLAS's last bits depend on where an operand starts, docs/memory.md §8.)"""
    for suffix in ("", " fp16"):
        want = load(text["whole" + suffix], dtype)
        assert_equal_params(want, load(text[kind + suffix], dtype))
        monkeypatch.setattr(loading, "RELEASE_BYTES", 0)
        assert_equal_params(want, load(text[kind + suffix], dtype))
        monkeypatch.undo()
        with torch.no_grad():
            a, b = want(ids()).float(), load(text[kind + suffix], dtype)(ids()).float()
        assert torch.allclose(a, b, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2), (a - b).abs().max()


def file_mappings(path: Path) -> list[tuple[int, int]]:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps to see memory mappings")
    return [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps.read_text().splitlines()
            if line.endswith(str(path.resolve()))]


def test_same_dtype_is_memory_mapped_from_the_shards(text):
    """Loaded in the stored dtype on the CPU, every parameter is a view of its shard's mapping (no copy)."""
    net = load(text["split"])
    layout = read_layout(text["split"])
    ranges = {shard: file_mappings(shard) for shard in shard_files(text["split"])}
    by_name = {n: k for k, n in names_of(text["split"]).items()}
    for name, p in net.named_parameters():
        shard = layout.file_of[by_name[name]]
        assert any(lo <= p.data_ptr() < hi for lo, hi in ranges[shard]), f"{name}: not a view of {shard.name}"


@pytest.mark.parametrize("kind", SHARDED)
def test_upcast_weights_is_bit_equal(text, kind):
    """Half-precision weights kept as the shards store them, up-cast per block: the kept tensors and the output
    equal those of the whole fp16 file."""
    nets = [upcast_weights(module(), text[k], names_of(text[k]), torch.float32, CPU, WHAT, keep=torch.float16)
            for k in ("whole fp16", kind + " fp16")]
    a, b = (weights_of(n).tensors for n in nets)
    assert a.keys() == b.keys() and all(a[k].dtype == torch.float16 and torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(nets[0](ids()), nets[1](ids()))


def fetched(net) -> dict[str, torch.Tensor]:
    """Every parameter of a streamed network as its blocks fetch it (copied out of the arena)."""
    out, prefix = {}, {m: n for n, m in net.named_modules()}
    for block in blocks(net):
        with weights_of(net).block(block):
            out.update({f"{prefix[block]}.{n}": p.clone() for n, p in block.named_parameters()})
    return out


@pytest.mark.parametrize("kind", SHARDED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("staged", [False, True])
def test_stream_weights_is_bit_equal(text, kind, dtype, staged, monkeypatch):
    """Streamed from a set: each block's tensors equal the whole file's resident ones, and the output equals the
    resident output from the same set (the CPU path, and the GPU's staged path run on the CPU)."""
    monkeypatch.setattr(StreamedWeights, "staged", staged)
    read = []
    monkeypatch.setattr(StreamedWeights, "host_buffer", lambda self, n: read.append(n) or ARENA.take(n))
    for suffix in ("", " fp16"):
        path = text[kind + suffix]
        net = stream_weights(module(), path, names_of(path), dtype, CPU, WHAT)
        assert isinstance(weights_of(net).file, ShardedWeightFile)
        got, want = fetched(net), params(load(text["whole" + suffix], dtype))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        with torch.no_grad():
            assert torch.equal(net(ids()), load(path, dtype)(ids()))
    assert bool(read) == staged, "the staged path did (not) run"


def test_open_weights_of_a_whole_file_is_a_weight_file(text):
    assert type(open_weights(text["whole"])) is WeightFile
    sharded = open_weights(text["split"])
    assert isinstance(sharded, ShardedWeightFile) and set(sharded.files) == set(shard_files(text["split"]))


@pytest.mark.parametrize("change", ["cut short", "rewritten"])
def test_shard_changed_during_a_run_is_named(text, tmp_path, change):
    folder = Path(shutil.copytree(text["split"].parent, tmp_path / "set"))
    index = folder / text["split"].name
    net = stream_weights(module(), index, names_of(index), torch.float32, CPU, WHAT)
    with torch.no_grad():
        net(ids())
    shard = shard_files(index)[1]
    data = shard.read_bytes()
    if change == "cut short":
        shard.write_bytes(data[:-64])
    else:
        shard.write_bytes(data[:-8] + bytes(8))
        st = os.stat(shard)
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(UserError, match=rf"{re.escape(str(shard))}: the file changed or was cut short") as e:
        with torch.no_grad():
            net(ids())
    one_line(e)


# ---- broken sets: one line naming the file at fault ---------------------------------------------------------

LOADERS = {
    "read_header": lambda path: read_header(path),
    "load_strict": lambda path: load_strict(module(), path, names_of(path), torch.float32, CPU, WHAT),
    "stream_weights": lambda path: stream_weights(module(), path, names_of(path), torch.float32, CPU, WHAT),
    "upcast_weights": lambda path: upcast_weights(module(), path, names_of(path), torch.float32, CPU, WHAT,
                                                  keep=torch.float16),
}


def broken_copy(text, tmp_path: Path, how: str) -> tuple[Path, str]:
    """A copy of the hand-written set broken in one way; (its index, a regex the error must match)."""
    folder = Path(shutil.copytree(text["split"].parent, tmp_path / how.replace(" ", "-")))
    index = folder / text["split"].name
    first, second = shard_files(index)[:2]
    weight_map = json.loads(index.read_text())["weight_map"]
    key = next(k for k, name in weight_map.items() if name == first.name and "layers.1." in k)
    tensors, metadata = tensors_of(first)
    if how == "missing shard":
        second.unlink()
        return index, rf"{re.escape(str(second))}: shard not found: {index.name} maps \d+ tensor\(s\) to it"
    if how == "key missing from its shard":
        save_file({k: t for k, t in tensors.items() if k != key}, first, metadata=metadata)
        return index, rf"{re.escape(str(first))}: lacks 1 tensor\(s\) that {re.escape(index.name)} maps to it: " \
                      rf"{re.escape(key)};"
    if how == "key the index does not list":
        save_file({**tensors, "extra.weight": torch.zeros(3)}, first, metadata=metadata)
        return index, rf"{re.escape(str(first))}: holds 1 tensor\(s\) that {re.escape(index.name)} does not map to " \
                      r"it: extra\.weight;"
    if how == "truncated shard":
        data = second.read_bytes()
        second.write_bytes(data[:len(data) // 2])
        return index, rf"{re.escape(str(second))}: truncated: .* but the file has {len(data) // 2}; .*download it again"
    if how == "garbage shard":
        second.write_bytes(b"not a checkpoint at all\n" * 10)
        return index, rf"{re.escape(str(second))}: not a safetensors file"
    if how == "tensor missing from the set":  # consistent set, but the network lacks a weight
        save_file({k: t for k, t in tensors.items() if k != key}, first, metadata=metadata)
        index.write_text(json.dumps({"weight_map": {k: v for k, v in weight_map.items() if k != key}}))
        return index, rf"{re.escape(str(index))}: 1 {WHAT} tensor\(s\) missing: {re.escape(_text_name(key, ()))};"
    if how == "index not json":
        index.write_text("{not json")
        return index, rf"{re.escape(str(index))}: not a safetensors index \(not valid JSON"
    if how == "index without weight_map":
        index.write_text(json.dumps({"metadata": {}}))
        return index, rf"{re.escape(str(index))}: not a safetensors index \(no \"weight_map\""
    if how == "shard outside the folder":
        index.write_text(json.dumps({"weight_map": {**weight_map, key: f"../{first.name}"}}))
        return index, rf"{re.escape(str(index))}: maps tensor {re.escape(key)} to '\.\./{re.escape(first.name)}', " \
                      "which is not a file name beside the index"
    if how == "pickled shard":
        index.write_text(json.dumps({"weight_map": {**weight_map, key: "pytorch_model-00001-of-00002.bin"}}))
        return index, r"pytorch_model-00001-of-00002\.bin: \.bin files are pickles, which minidiffseg never loads"
    if how == "no index":
        index.unlink()
        return index, rf"{re.escape(str(index))}: file not found"
    raise AssertionError(how)


BROKEN = ["missing shard", "key missing from its shard", "key the index does not list", "truncated shard",
          "garbage shard", "tensor missing from the set", "index not json", "index without weight_map",
          "shard outside the folder", "pickled shard", "no index"]


@pytest.mark.parametrize("how", BROKEN)
def test_broken_set_is_one_line_naming_the_file(text, tmp_path, how):
    """The same one line from the header check, resident loading, streaming and up-casting."""
    index, expected = broken_copy(text, tmp_path, how)
    messages = set()
    for name, run in LOADERS.items():
        if how == "tensor missing from the set" and name == "read_header":
            assert read_header(index)  # the set itself is sound: the network is what lacks a tensor
            continue
        with pytest.raises(UserError) as e:
            run(index)
        messages.add(one_line(e))
    assert len(messages) == 1, messages
    assert re.search(expected, messages.pop())


def test_check_reads_each_shard(text, tmp_path):
    """A shard whose header passes the hand check but that safetensors refuses (overlapping tensors) is named."""
    folder = Path(shutil.copytree(text["split"].parent, tmp_path / "set"))
    index = folder / text["split"].name
    shard = shard_files(index)[2]
    n = int.from_bytes(shard.read_bytes()[:8], "little")
    header = json.loads(shard.read_bytes()[8:8 + n])
    first, second = [k for k in header if k != "__metadata__"][:2]
    header[second]["data_offsets"] = [header[first]["data_offsets"][0],
                                       header[first]["data_offsets"][0] + header[second]["data_offsets"][1]
                                       - header[second]["data_offsets"][0]]  # overlaps `first`
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + shard.read_bytes()[8 + n:])
    with pytest.raises(UserError, match=rf"{re.escape(str(shard))}: unreadable safetensors file") as e:
        load_strict(module(), index, names_of(index), torch.float32, CPU, WHAT)
    one_line(e)


# ---- finding a component's weights ------------------------------------------------------------------------

def touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


@pytest.mark.parametrize("present, variant, found", [
    (["model.safetensors", "model.safetensors.index.json", "model.fp16.safetensors"], None, "model.safetensors"),
    (["model.safetensors.index.json", "model.fp16.safetensors"], None, "model.safetensors.index.json"),
    (["model.fp16.safetensors", "model.safetensors.index.fp16.json"], None, "model.fp16.safetensors"),
    (["model.safetensors.index.fp16.json"], None, "model.safetensors.index.fp16.json"),
    (["model.safetensors.fp16.index.json"], None, "model.safetensors.fp16.index.json"),  # diffusers' legacy name
    (["model.safetensors", "model.safetensors.index.json", "model.safetensors.index.fp16.json"], "fp16",
     "model.safetensors.index.fp16.json"),
    (["model.safetensors.index.fp16.json", "model.fp16.safetensors"], "fp16", "model.fp16.safetensors"),
])
def test_weights_file_prefers_fp32_then_unsharded(tmp_path, present, variant, found):
    folder = touch(tmp_path / "text_encoder_3", *present)
    assert weights_file(folder, "model", variant) == folder / found


def test_weights_file_errors(tmp_path):
    folder = touch(tmp_path / "text_encoder_3", "model.safetensors", "model.safetensors.index.json")
    with pytest.raises(UserError) as e:
        weights_file(folder, "model", "fp16", fix="fetch it with `minidiffseg download --what sd3-medium`")
    assert one_line(e) == (f"{folder}: no model.fp16.safetensors or model.safetensors.index.fp16.json found; fetch it "
                           "with `minidiffseg download --what sd3-medium`")
    pickled = touch(tmp_path / "pickled", "model-00001-of-00002.bin", "model.bin.index.json")
    with pytest.raises(UserError, match=r"model-00001-of-00002\.bin: \.bin files are pickles"):
        weights_file(pickled, "model", None)
    with pytest.raises(UserError, match=r"empty: no model\.safetensors or model\.safetensors\.index\.json or "
                                        r"model\.fp16\.safetensors or model\.safetensors\.index\.fp16\.json found"):
        weights_file(touch(tmp_path / "empty"), "model", None)
    touch(tmp_path / "i")
    (tmp_path / "i" / "x.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x-1.safetensors"}}))
    assert read_index(tmp_path / "i" / "x.safetensors.index.json").file_of == {"a": tmp_path / "i" / "x-1.safetensors"}


# ---- whole checkpoints: load_sd and inspect-weights -----------------------------------------------------------

@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    return tiny_sd.write_tiny_single_file(tmp_path_factory.mktemp("single") / "sd15-tiny.safetensors")


def test_sharded_single_file_loads_and_inspects_as_the_whole(single_file, tmp_path, capsys):
    """An LDM single file split into three shards: load_sd of its index holds the whole file's weights, bit for
    bit, and streamed computes what it computes resident; inspect-weights lists it with the shards' total size
    and hashes each shard."""
    from minidiffseg.cli import main
    from minidiffseg.sd import load_sd

    index = split(single_file, tmp_path / "sharded")
    shutil.copytree(single_file.parent / "tokenizer", index.parent / "tokenizer")
    whole, resident, streamed = load_sd(single_file), load_sd(index), load_sd(index, stream=True)
    assert whole.name == resident.name == streamed.name == "SD1.5"
    for net in ("unet", "vae", "text_encoder"):
        assert_equal_params(getattr(whole, net), getattr(resident, net))
    g = torch.Generator().manual_seed(0)
    z, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, whole.unet.cfg.cross_attention_dim, generator=g)
    tokens = whole.tokenizer(["a cat"])
    with torch.no_grad():
        assert torch.equal(streamed.unet(z, 100, ctx), resident.unet(z, 100, ctx))
        assert torch.equal(streamed.text_encoder(tokens), resident.text_encoder(tokens))
    assert main(["inspect-weights", str(index), "--sha256"]) == 0
    out = capsys.readouterr().out
    total = sum(f.stat().st_size for f in shard_files(index))
    assert "LDM single file" in out and "OK:" in out and index.name in out
    assert f"{total / 1e6:.1f} MB" in out, out
    for shard in shard_files(index):
        assert re.search(rf"sha256 [0-9a-f]{{64}}  {re.escape(shard.name)}: not an official file", out), out
    (index.parent / shard_files(index)[0].name).unlink()
    assert main(["inspect-weights", str(index)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard not found" in err[0] and shard_files(index)[0].name in err[0], err


def test_diffusers_folder_with_a_sharded_text_encoder(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    """How sd/checkpoint.py takes shards once `_weights` is `weights_file` (the lead's integration, done here by
    a patch): a folder whose text encoder is sharded loads, streams and inspects as the whole folder."""
    from minidiffseg.cli import main
    from minidiffseg.sd import checkpoint, load_sd

    monkeypatch.setattr(checkpoint, "_weights", lambda component, variant: weights_file(
        component, checkpoint.WEIGHTS[component.name], variant))
    folder = Path(shutil.copytree(tiny_sd_dir, tmp_path / "sd"))
    whole = folder / "text_encoder" / "model.safetensors"
    split(whole, whole.parent, parts=2)
    whole.unlink()
    want, resident, streamed = load_sd(tiny_sd_dir), load_sd(folder), load_sd(folder, stream=True)
    for net in ("unet", "vae", "text_encoder"):
        assert_equal_params(getattr(want, net), getattr(resident, net))
    tokens = want.tokenizer(["a cat", "a dog"])
    with torch.no_grad():
        assert torch.equal(streamed.text_encoder(tokens), resident.text_encoder(tokens))
    assert main(["inspect-weights", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "text_encoder/model.safetensors.index.json" in out and "OK:" in out, out
