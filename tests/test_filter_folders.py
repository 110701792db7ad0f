"""Where the class filter's models are read from (minidiffseg/filter/checkpoint.py): a folder, or the hub id
itself resolved from the Hugging Face cache as `--weights` is for Stable Diffusion; a folder holding only
the pickled `pytorch_model.bin` is refused as the SD loader refuses pickles."""

from pathlib import Path

import huggingface_hub
import huggingface_hub.constants  # (a lazily imported submodule)
import pytest
from PIL import Image
from safetensors.torch import save

from minidiffseg.cli import main
from minidiffseg.errors import UserError
from minidiffseg.filter import blip, clip_model
from minidiffseg.filter.checkpoint import check_folder, resolve_folder
from minidiffseg.filter.filters import make_filter
from minidiffseg.vocabularies import get_vocabulary

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODELS = {"clip": (clip_model.WHAT, clip_model.HUB_ID), "blip": (blip.WHAT, blip.HUB_ID)}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_copy(cache: Path, repo_id: str, folder: Path) -> Path:
    """`folder`'s files where huggingface_hub caches `repo_id` (refs/main names the snapshot)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    for f in folder.rglob("*"):
        if f.is_file():
            (snapshot / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / f.relative_to(folder)).write_bytes(f.read_bytes())
    return snapshot


def placeholders(folder: Path, kind: str) -> Path:
    """The files `download --what kind` fetches, with placeholder contents (an empty safetensors file)."""
    from minidiffseg.sd import hub

    folder.mkdir(parents=True, exist_ok=True)
    for name in hub.files(kind):
        (folder / name).write_bytes(save({}) if name.endswith(".safetensors") else b"{}")
    return folder


@pytest.mark.parametrize("kind", list(MODELS))
def test_pickle_only_folder_is_refused_as_a_pickle(tmp_path, kind):
    what, hub_id = MODELS[kind]
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError) as e:
        check_folder(tmp_path, what, hub_id)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{tmp_path / 'pytorch_model.bin'}: .bin files are pickles, "
                                                "which minidiffseg never loads (they can run code)")
    assert f"model.safetensors of {hub_id}" in line and f"minidiffseg download --what {kind}" in line
    loader = clip_model.ZeroShotCLIP if kind == "clip" else blip.Captioner
    with pytest.raises(UserError, match="pickles"):
        loader.from_pretrained(tmp_path)


def test_pickle_only_folder_from_the_command_line(tmp_path, capsys):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "pytorch_model.bin").write_bytes(b"not loaded")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    rc = main(["filter", str(tmp_path / "x.png"), "--vocabulary", "voc", "--out", str(tmp_path / "l.json"),
               "--filter", "clip", "--clip-weights", str(tmp_path / "clip")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pickles, which minidiffseg never loads" in err[0], err


@pytest.mark.parametrize("kind", list(MODELS))
def test_hub_id_resolved_from_the_cache(hub_cache, tmp_path, kind):
    what, hub_id = MODELS[kind]
    with pytest.raises(UserError) as e:
        check_folder(hub_id, what, hub_id)
    assert f"{hub_id} is not in the Hugging Face cache" in str(e.value)
    assert f"`minidiffseg download --what {kind}`" in str(e.value) and "\n" not in str(e.value)
    snapshot = cache_copy(hub_cache, hub_id, placeholders(tmp_path / kind, kind))
    assert resolve_folder(hub_id, hub_id) == snapshot
    assert check_folder(hub_id, what, hub_id) == snapshot / "model.safetensors"
    assert resolve_folder(tmp_path / kind, hub_id) == tmp_path / kind  # a folder stays itself


def test_clip_filter_by_hub_id_loads(hub_cache, tmp_path):
    """The whole path: `make_filter(clip_dir=<hub id>)` and the CLIP loader read the cached copy."""
    from dataclasses import replace

    from test_filter_clip import EOS, save_tiny_clip

    save_tiny_clip(tmp_path / "clip")
    cache_copy(hub_cache, clip_model.HUB_ID, tmp_path / "clip")
    zs = clip_model.ZeroShotCLIP.from_pretrained(clip_model.HUB_ID)
    tiny = clip_model.CLIPConfig.tiny()  # the saved config names CLIP's real EOS id
    assert zs.model.cfg == replace(tiny, text=replace(tiny.text, eos_token_id=EOS))
    filt = make_filter("clip", get_vocabulary("voc"), clip_dir=clip_model.HUB_ID)
    assert filt is not None
