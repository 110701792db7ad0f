"""`minidiffseg download` and finding downloaded weights again (issue 7, docs/design.md §4).

The hub is not reachable from the test machines, so:
- what `download` asks the hub for is checked with huggingface_hub's `HfApi` / `snapshot_download`
  replaced by fakes that serve the tiny checkpoint (only the test patches; the product calls the real ones);
- the real huggingface_hub runs in subprocesses for what needs no network: an unreachable endpoint
  (one error line), HF_HUB_OFFLINE=1 with and without a cached copy, and `--weights <hub id>` resolved
  from a cache laid out the way huggingface_hub lays it out.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from safetensors.torch import save

from minidiffseg.sd import hub as download
from minidiffseg.cli import main

import tiny_sd  # noqa: E402  (needs diffusers and transformers: assets.require)
import huggingface_hub  # noqa: E402  (a runtime dependency)

REPO = Path(__file__).resolve().parents[1]
SD15 = download.REPOS["sd15"].repo_id
COMMIT = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"  # any 40-hex revision; this is SD1.5's at the time of writing


class FakeHub:
    """Stands in for the hub: lists a repo's files with sizes and 'downloads' them from the tiny checkpoint."""

    def __init__(self, tiny: Path, extra_size: int = 0):
        self.tiny, self.extra_size, self.calls = tiny, extra_size, []
        # what the real repos hold besides the files minidiffseg loads (never to be fetched)
        self.others = ["safety_checker/model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
                       "v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors", "pytorch_model.bin",
                       "feature_extractor/preprocessor_config.json", "tf_model.h5"]

    def source(self, repo_id: str, name: str) -> Path:
        if repo_id == SD15:
            return self.tiny / name
        return self.tiny / "tokenizer" / "vocab.json"  # CLIP/BLIP: any bytes will do, only sizes are listed

    def files(self, repo_id: str) -> list[str]:
        what = next(w for w, r in download.REPOS.items() if r.repo_id == repo_id)
        return download.files(what, "fp16") + download.files(what, "fp32") + self.others

    def model_info(self, repo_id, files_metadata=False):
        self.calls.append(("model_info", repo_id))
        siblings = [SimpleNamespace(rfilename=f, size=(self.source(repo_id, f).stat().st_size
                                                       if self.source(repo_id, f).exists() else 1) + self.extra_size)
                    for f in self.files(repo_id)]
        return SimpleNamespace(siblings=siblings, sha=COMMIT)

    def snapshot_download(self, repo_id, allow_patterns=None, local_dir=None, **kw):
        self.calls.append(("snapshot_download", repo_id, list(allow_patterns), local_dir))
        target = Path(local_dir)
        for f in self.files(repo_id):
            if f in allow_patterns:  # download asks for exact names
                (target / f).parent.mkdir(parents=True, exist_ok=True)
                if repo_id == SD15:
                    shutil.copy(self.source(repo_id, f), target / f)
                else:  # placeholders; a valid (empty) safetensors file passes download's header check
                    (target / f).write_bytes(save({}) if f.endswith(".safetensors") else b"{}")
        return str(target)


@pytest.fixture
def hub(tiny_sd_dir, monkeypatch):
    fake = FakeHub(tiny_sd_dir)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: fake)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, f"exit code {rc}:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("minidiffseg: error: "), err
    return lines[0]


# ---- what is asked of the hub (fake hub) ---------------------------------------------------------

def test_sd15_fetches_only_the_loaded_files_and_prints_sizes_first(hub, tmp_path, capsys):
    rc, out, err = cli(capsys, "download", "--dir", tmp_path / "sd15")
    assert rc == 0, err
    (_, repo), (_, repo2, patterns, local_dir) = hub.calls
    assert repo == repo2 == SD15 and Path(local_dir) == tmp_path / "sd15"
    assert sorted(patterns) == sorted([
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt"])
    assert not any(re.search(r"safety_checker|\.bin$|\.ckpt$|pruned", p) for p in patterns)
    total = sum((tmp_path / "sd15" / p).stat().st_size for p in patterns)
    assert re.search(rf"{SD15} @ {COMMIT[:12]}: 8 files, {re.escape(download.gb(total))}", out), out
    for p in patterns:
        assert p in out
    assert f"is in {tmp_path / 'sd15'}: pass it as --weights" in out
    # what was fetched loads
    rc, out, err = cli(capsys, "inspect-weights", tmp_path / "sd15")
    assert rc == 0 and "OK:" in out, err


def test_fp32_variant_and_all(hub, tmp_path, capsys):
    rc, _, err = cli(capsys, "download", "--what", "all", "--variant", "fp32", "--dir", tmp_path / "w")
    assert rc == 0, err
    fetched = {c[1]: (c[2], Path(c[3])) for c in hub.calls if c[0] == "snapshot_download"}
    assert fetched[SD15][0] == download.files("sd15", "fp32") and not any(".fp16." in p for p in fetched[SD15][0])
    assert fetched["openai/clip-vit-large-patch14"] == (["config.json", "model.safetensors", "vocab.json",
                                                         "merges.txt"], tmp_path / "w" / "clip-vit-large-patch14")
    assert fetched["Salesforce/blip-image-captioning-large"] == (["config.json", "model.safetensors", "vocab.txt"],
                                                                 tmp_path / "w" / "blip-image-captioning-large")
    assert fetched[SD15][1] == tmp_path / "w" / "stable-diffusion-v1-5"


def test_not_enough_disk_space(hub, tmp_path, capsys):
    hub.extra_size = 10**18  # an exabyte per file
    line = one_error_line(*cli(capsys, "download", "--dir", tmp_path / "sd15")[::2])
    assert re.search(rf"{SD15} needs .* GB but only .* is free at .*: free some space or choose another --dir", line)
    assert [c[0] for c in hub.calls] == ["model_info"], "nothing may be downloaded"


def test_repo_without_a_wanted_file(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hub, "files", lambda repo_id: ["unet/config.json"])
    line = one_error_line(*cli(capsys, "download", "--dir", tmp_path / "sd15")[::2])
    assert f"the hub repo {SD15} (revision {COMMIT}) has no unet/diffusion_pytorch_model.fp16.safetensors" in line


# ---- the real huggingface_hub, no network needed (subprocesses: its settings are read at import) ----

def minidiffseg(tmp_path: Path, *argv, **env) -> subprocess.CompletedProcess:
    """`minidiffseg ARGV` in a child with its own HF_HOME, no HF_* settings and no proxy (a proxy would answer
    for the unreachable endpoint); stdout and stderr are kept for the assertions' messages."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and not k.lower().endswith("_proxy")}
    environ.update(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", **env)
    return subprocess.run([sys.executable, "-m", "minidiffseg", *map(str, argv)], capture_output=True, text=True,
                          env=environ, cwd=tmp_path, timeout=300)


def fake_cache(tmp_path: Path, tiny: Path) -> Path:
    """The tiny checkpoint where huggingface_hub caches stable-diffusion-v1-5 under HF_HOME: refs/main names
    the commit, snapshots/<commit>/ holds the files (real caches link them to blobs/; files read the same)."""
    repo = tmp_path / "hf-home" / "hub" / f"models--{SD15.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    for f in download.files("sd15", "fp16"):
        (snapshot / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny / f, snapshot / f)
    return snapshot


def test_no_network_is_one_line(tmp_path):
    r = minidiffseg(tmp_path, "download", "--dir", tmp_path / "sd15", HF_ENDPOINT="http://127.0.0.1:9")
    line = one_error_line(r.returncode, r.stderr)
    assert re.search(rf"could not download {SD15} from http://127\.0\.0\.1:9 \(.+\): check the network .*rerun "
                     rf"`minidiffseg download --what sd15 --dir {re.escape(str(tmp_path / 'sd15'))}`", line), line


def test_offline_not_cached(tmp_path):
    r = minidiffseg(tmp_path, "download", "--what", "clip", HF_HUB_OFFLINE="1")
    line = one_error_line(r.returncode, r.stderr)
    assert re.search(r"HF_HUB_OFFLINE is set and openai/clip-vit-large-patch14 is not \(completely\) in .*hf-home/hub: "
                     r"run `minidiffseg download --what clip` with network access", line), line


def test_offline_weights_by_hub_id_not_cached(tmp_path, tiny_sd_dir):
    shutil.copy(tiny_sd_dir / "tokenizer" / "vocab.json", tmp_path / "x.png")  # never read: weights fail first
    r = minidiffseg(tmp_path, "segment", "x.png", "--classes", "cat", "--weights", SD15, "--out", "out",
                    HF_HUB_OFFLINE="1")
    line = one_error_line(r.returncode, r.stderr)
    assert f"{SD15} is not in the Hugging Face cache" in line and "`minidiffseg download --what sd15`" in line, line


def test_offline_cached_copy_is_found(tmp_path, tiny_sd_dir):
    """With HF_HUB_OFFLINE=1 and SD1.5 in the cache: `download` finds it and says where, `segment` takes the
    hub id as --weights, and `download --dir` accepts a folder already downloaded."""
    snapshot = fake_cache(tmp_path, tiny_sd_dir)
    r = minidiffseg(tmp_path, "download", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert f"Stable Diffusion 1.5 is in {snapshot}: pass it as --weights" in r.stdout, r.stdout

    Image.new("RGB", (40, 30), (90, 140, 200)).save(tmp_path / "x.png")
    r = minidiffseg(tmp_path, "segment", "x.png", "--classes", "sky", "--weights", SD15, "--out", "out",
                    "--resolution", "64", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "x_scores.safetensors").is_file()

    local = Path(shutil.copytree(snapshot, tmp_path / "weights" / "sd15"))
    r = minidiffseg(tmp_path, "download", "--dir", local, HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert f"is in {local}" in r.stdout


def test_inspect_sha256(tiny_sd_dir, capsys):
    rc, out, err = cli(capsys, "inspect-weights", tiny_sd_dir, "--sha256")
    assert rc == 0, err
    unet = tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(unet.read_bytes()).hexdigest()
    assert f"sha256 {digest}  unet/diffusion_pytorch_model.safetensors: not an official file" in out, out
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in download.KNOWN_SHA256)
