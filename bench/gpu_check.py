"""The GPU check: one command for whoever has an NVIDIA GPU (H100/H200) for a few minutes (issue 21).

    python -m bench.gpu_check               # on the GPU machine: ≤ 8 minutes -> bench/results/gpu-<device>.md
    python -m bench.gpu_check --dry-run     # on a CPU: every step with the tiny model (figures mean nothing)
    python -m bench.gpu_check --steps segment,refine --out /tmp/check.md --budget 300

Steps, each timed and each run in its own process (a crash, a hang or a poisoned CUDA context stays in
its step; what a step measured before it failed is kept), each failure recorded in the table as its
error's first line, and the table rewritten after every step:

1. tests     the tests that skip without CUDA (found by reading tests/: a `skipif` whose condition names
             cuda, or a `cuda`/`gpu` mark), run with pytest in a subprocess: passed/failed/skipped counts;
2. segment   `minidiffseg segment` on a tiny random model with NO --device: exit code, outputs written, and
             which device the command chose (the CUDA memory it allocated);
3. pipeline  full-size random SD1.5 weights (written once into --cache) in fp16 and bf16, C = 4 classes,
             512²: the Segmenter's steps one by one as bench/ours.py calls them (prompts → encode_text →
             encode_image → noises → record → fuse → refine → post-process), CUDA events, one warm-up then
             the median of --repeats; the whole `Segmenter.__call__` per image; peak memory
             (`max_memory_allocated`, reset per setting); every map finite; resident vs `stream=True` and
             the largest score difference between them;
4. sd3       the same for full-size random SD3-medium WITHOUT T5 (written once into --cache by `write_random_sd3`:
             transformer, 16-channel VAE, CLIP-L and bigG; T5-XXL's 9.5 GB are too slow to write within the budget,
             so the transformer reads zeros in T5's 256 places, as `download --no-t5`) at 1024², fp16 and bf16,
             resident and `stream=True`, and which dtype the VAE computed in (force_upcast: float32 under fp16);
5. refine    the fused refinement (minidiffseg/method/refine.py `refine`) against the naive S·A that builds
             S (`refine_naive`) at 512²: time, extra memory, max abs difference (also to a float32 naive);
6. torchrun  `minidiffseg eval` under `python -m torch.distributed.run` (one process per GPU, at most 2) on
             a tiny fake VOC split, and an NCCL all_reduce through the same launcher: exit codes, results;
7. report    bench/results/gpu-<device>.md (the commit, torch/CUDA versions, the device, a table per step,
             the goal "C = 4 per image ≤ 100 ms in fp16" beside the measured time), also printed.

Nothing here needs diffusers, transformers or a download (the GPU machines have no network and no
diffusers): the random checkpoints are written in the official diffusers folder layout from
minidiffseg's own networks built on the meta device (`write_random_sd`, `write_random_sd3`), with a synthetic
CLIP-sized tokenizer (`synthetic_tokenizer`); they cost exactly the compute of real weights.

--dry-run (any machine): the same steps on the CPU with the tiny models at 128², so the whole script and
the report are exercised; what needs CUDA (the CUDA tests, NCCL) is recorded as "skipped: no CUDA".
A total time budget (--budget, default 450 s) bounds the run: a step that would start with less than
MIN_START_S left is skipped as such, each step's process is stopped at its own budget or at the total's
end, and the pipeline and sd3 steps measure no further setting once the time is short.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/gpu_check.py` as well as `python -m bench.gpu_check`
    sys.path.insert(0, str(ROOT))

STEPS = ["tests", "segment", "pipeline", "sd3", "refine", "torchrun"]  # --steps names (or their numbers 1..6)
TITLES = {"tests": "CUDA tests (pytest)", "segment": "`minidiffseg segment`, no --device, tiny model",
          "pipeline": "Full-size SD1.5 (random weights), C = 4, stage by stage",
          "sd3": "Full-size SD3-medium without T5 (random weights), C = 4, 1024², stage by stage",
          "refine": "Fused refinement vs the naive S·A", "torchrun": "`minidiffseg eval` under torchrun"}
NEEDS_CUDA = {"tests"}  # skipped as a whole without CUDA (the others run on the CPU in a dry run)
STEP_BUDGET_S = {"tests": 120, "segment": 90, "pipeline": 240, "sd3": 180, "refine": 60,
                 "torchrun": 120}  # on the GPU
TOTAL_BUDGET_S = 450  # the whole run stays under 8 minutes
MIN_START_S = 15  # a step is not started with less time left than this
SETTING_S = 20  # the pipeline measures no further setting with less time left than this
SD3_SETTING_S = 30  # nor the sd3 step (6 GB of weights to load, or to stream through each of 10 images)
GOAL_MS = 100  # C = 4 per image ≤ 100 ms in fp16 on an H100/H200 (issue 21)
CLASSES = ["cat", "dog", "sofa", "person"]  # VOC names, one BPE token each in CLIP's vocabulary
DRY_RES, GPU_RES = 128, 512  # the dry run's tiny model runs at 128² (16² latents)
DRY_SD3_RES, SD3_RES = 128, 1024  # SD3 at its training size (64² tokens); the tiny one at 128² (8² tokens)
DRY_REFINE_RES = 64  # and the refinement alone at 64² (fp16 matmuls on a CPU are ~400× slower)
CACHE = ROOT / "bench" / ".cache" / "gpu-check"
MARKER = "complete"
NOT_MEASURED = "—"


# ---------------------------------------------------------------------------------------- results

@dataclass
class StepResult:
    """One step's outcome: `status` is "ok", "failed: <first line of the error>" or "skipped: <why>";
    `tables` hold the rows measured so far (each a dict column -> text; missing cells print as —)."""

    key: str
    status: str = "not run"
    seconds: float | None = None
    tables: list[dict] = field(default_factory=list)  # {"title", "columns", "rows"}
    notes: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)  # values the report's header uses (e.g. the fp16 time per image)
    path: str | None = None  # where the step's process saves itself after every row

    def table(self, title: str, columns: list[str]) -> list[dict]:
        """A new table; returns its row list to append to."""
        self.tables.append(dict(title=title, columns=columns, rows=[]))
        return self.tables[-1]["rows"]

    def save(self) -> None:
        if self.path:
            tmp = Path(self.path + ".tmp")
            tmp.write_text(json.dumps(asdict(self)))
            tmp.replace(self.path)

    @classmethod
    def load(cls, path: Path) -> "StepResult":
        return cls(**json.loads(Path(path).read_text()))


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` (the table's one line per failure)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def failed_row(first: str, label: str, error: BaseException | str) -> dict:
    return {first: label, "status": "failed: " + (error if isinstance(error, str) else first_line(error))}


@dataclass
class Context:
    """What every step's process is told (JSON on its command line)."""

    dry_run: bool
    cuda: bool
    cache: str
    work: str
    repeats: int
    deadline: float  # time.time() by which the whole run must be done

    def left(self) -> float:
        return self.deadline - time.time()

    @property
    def device(self) -> str:
        return "cuda" if self.cuda and not self.dry_run else "cpu"

    @property
    def resolution(self) -> int:
        return DRY_RES if self.dry_run else GPU_RES


# ---------------------------------------------------------------------------------------- weights

def synthetic_tokenizer():
    """A CLIP tokenizer of CLIP's size (49408 tokens: 256 byte characters, the same with "</w>", 48894
    merges, BOS, EOS) whose merges are made up (a character + a word-final character): no BPE file is
    needed. Every prompt still becomes 77 ids, so it costs what the real one costs."""
    from minidiffseg.sd.tokenizer import BOS, EOS, VOCAB_SIZE, CLIPTokenizer, byte_chars

    chars = byte_chars()
    n = VOCAB_SIZE - 2 * len(chars) - 2
    merges = [(a, b + "</w>") for a in chars for b in chars][:n]
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, merges)


def random_state(module, generator, dtype):
    """Random values for every parameter of `module` (built on meta), on the CPU, as tests/tiny_sd.py
    `randomise_` draws them: norm affines near (1, 0), other biases small, weights of variance 1/fan_in, so
    activations keep a real network's scale (what matters for fp16's range). Drawn on the generator's
    device (a GPU draws a billion numbers in milliseconds)."""
    import torch

    state = {}
    for prefix, m in module.named_modules():
        norm = type(m).__name__ in ("GroupNorm", "LayerNorm", "RMSNorm")
        for name, p in m.named_parameters(recurse=False):
            noise = torch.randn(tuple(p.shape), generator=generator, device=generator.device)
            if norm:
                t = (1.0 if name == "weight" else 0.0) + 0.1 * noise
            elif p.ndim == 1:
                t = 0.05 * noise
            else:
                t = noise / math.sqrt(math.prod(p.shape[1:]))
            state[f"{prefix}.{name}" if prefix else name] = t.to(dtype).cpu()
    return state


def write_random_sd(folder: Path, tiny: bool, seed: int = 0) -> Path:
    """Random SD1.5 in the official diffusers folder layout, as `minidiffseg download` fetches it (the `.fp16`
    files, config.json per network, tokenizer/), written once into `folder` (a `complete` marker last).
    Built from minidiffseg's own networks on the meta device: no diffusers or transformers needed.
    The VAE file holds the encoder half only (the loader ignores the decoder by name anyway)."""
    import torch
    from safetensors.torch import save_file

    from minidiffseg.sd.clip import CLIPTextModel
    from minidiffseg.sd.config import CLIPTextConfig, UNetConfig, VAEConfig
    from minidiffseg.sd.loading import build_on_meta
    from minidiffseg.sd.unet import UNet
    from minidiffseg.sd.vae import VAEEncoder

    folder = Path(folder)
    if (folder / MARKER).is_file():
        return folder
    unet_cfg, vae_cfg, text_cfg = ((UNetConfig.tiny(), VAEConfig.tiny(), CLIPTextConfig.tiny()) if tiny
                                   else (UNetConfig(), VAEConfig(), CLIPTextConfig()))
    unet_json = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(unet_cfg).items() if k != "num_heads"}
    unet_json["attention_head_dim"] = unet_cfg.num_heads  # diffusers' name for SD1.5's head count
    parts = [("unet", UNet, unet_cfg, "diffusion_pytorch_model", {"_class_name": "UNet2DConditionModel", **unet_json}),
             ("vae", VAEEncoder, vae_cfg, "diffusion_pytorch_model",
              {"_class_name": "AutoencoderKL", **{k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in asdict(vae_cfg).items()}}),
             ("text_encoder", CLIPTextModel, text_cfg, "model",
              {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **asdict(text_cfg)})]
    g = torch.Generator("cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)
    for name, cls, cfg, stem, config in parts:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
        state = random_state(build_on_meta(cls, cfg), g, torch.float16)
        save_file(state, folder / name / f"{stem}.fp16.safetensors", metadata={"format": "pt"})
        del state
    synthetic_tokenizer().save(folder / "tokenizer")
    (folder / MARKER).write_text("written by bench/gpu_check.py: random weights, for timing only\n")
    return folder


def tiny_weights(ctx: Context) -> Path:
    return write_random_sd(Path(ctx.cache) / "sd15-tiny", tiny=True)


def sd3_networks(tiny: bool) -> dict:
    """SD3-medium's networks without T5, as (module class, config, config.json dict) by component name: the
    transformer (MMDiTConfig.sd3_medium(), SD3Transformer2DModel's fields), the 16-channel VAE (AutoencoderKL's
    fields), CLIP-L and OpenCLIP bigG with their projections (transformers' CLIPTextConfig fields). `tiny`:
    tests/tiny_sd3.py's sizes (a 4-block MM-DiT on a 16² latent with a 12² table, two 16-wide towers projecting
    to 32 + 32 = the 64-wide pooled input, their 32 columns inside the 48-wide text)."""
    from dataclasses import replace

    from minidiffseg.sd.clip import CLIPTextModelWithProjection
    from minidiffseg.sd.config import CLIPTextConfig, VAEConfig
    from minidiffseg.sd.vae import VAEEncoder
    from minidiffseg.sd3.config import MMDiTConfig
    from minidiffseg.sd3.mmdit import MMDiT

    if tiny:
        mmdit = replace(MMDiTConfig.tiny(), sample_size=16, num_layers=4, joint_attention_dim=48, pos_embed_max_size=12)
        vae = VAEConfig(latent_channels=16, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, force_upcast=True)
        text = dict(hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, projection_dim=32)
        text_l, text_g = CLIPTextConfig(**text, hidden_act="quick_gelu"), CLIPTextConfig(**text, hidden_act="gelu")
    else:
        mmdit = MMDiTConfig.sd3_medium()
        vae = VAEConfig(latent_channels=16, block_out_channels=(128, 256, 512, 512), scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, force_upcast=True)
        text_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                projection_dim=768, hidden_act="quick_gelu")  # CLIP ViT-L/14
        text_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                projection_dim=1280, hidden_act="gelu")  # OpenCLIP ViT-bigG/14

    def fields(cfg) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}

    def clip(cfg) -> dict:  # the hub's SD3 text_encoder*/config.json ids (eos_token_id 2: pooled at argmax)
        return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "bos_token_id": 0,
                "pad_token_id": 1, **fields(cfg)}

    return {"transformer": (MMDiT, mmdit, {"_class_name": "SD3Transformer2DModel", **fields(mmdit)}),
            "vae": (VAEEncoder, vae, {"_class_name": "AutoencoderKL", "use_post_quant_conv": False, **fields(vae)}),
            "text_encoder": (CLIPTextModelWithProjection, text_l, clip(text_l)),
            "text_encoder_2": (CLIPTextModelWithProjection, text_g, clip(text_g))}


def sincos_table(cfg):
    """The MM-DiT's stored position table (1, M², D), M = pos_embed_max_size, as diffusers computes it
    (get_2d_sincos_pos_embed with base size sample_size / patch_size): a random table of 1/fan_in variance would be
    ~1e-5 where the real one is ±1, which would hide what fp16 does with it."""
    import torch

    m, d, base = cfg.pos_embed_max_size, cfg.inner_dim, cfg.sample_size // cfg.patch_size
    grid = torch.arange(m, dtype=torch.float64) / (m / base)
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d // 4))

    def one_d(pos):  # (M²,) -> (M², D/2)
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    w, h = torch.meshgrid(grid, grid, indexing="xy")  # numpy's meshgrid(grid_w, grid_h)
    return torch.cat([one_d(w.reshape(-1)), one_d(h.reshape(-1))], dim=1)[None]


def safetensors_params(path: Path) -> int:
    """Elements stored in a safetensors file (its header only)."""
    from minidiffseg.sd.loading import read_header

    return sum(math.prod(s) for s in read_header(path)[0].values())


SD3_FILES = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
             "text_encoder_2": "model"}  # the hub's SD3 folders: the plain names, holding fp16


def write_random_sd3(folder: Path, tiny: bool, seed: int = 0) -> Path:
    """Random SD3-medium without T5 in the official diffusers folder layout, as `minidiffseg download --what
    sd3-medium --no-t5` fetches it (the plain file names holding fp16, config.json per network, tokenizer/ and
    tokenizer_2/, scheduler/), written once into `folder` (a `complete` marker last), from minidiffseg's own
    networks on the meta device. The VAE file holds the encoder half only; the position table is the real sin-cos.
    T5-XXL (4.76 B parameters, 9.5 GB in fp16) is left out: too slow to write within the check's budget."""
    import torch
    from safetensors.torch import save_file

    from minidiffseg.sd.loading import build_on_meta

    folder = Path(folder)
    if (folder / MARKER).is_file():
        return folder
    g = torch.Generator("cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)
    for name, (cls, cfg, config) in sd3_networks(tiny).items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
        state = random_state(build_on_meta(cls, cfg), g, torch.float16)
        if name == "transformer":
            state["pos_embed.pos_embed"] = sincos_table(cfg).to(torch.float16)
        save_file(state, folder / name / f"{SD3_FILES[name]}.safetensors", metadata={"format": "pt"})
        del state
    tok = synthetic_tokenizer()
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):  # CLIP-L's pads with EOS, bigG's "!"
        tok.save(folder / name)
        if pad in tok.vocab:  # "!" is the first byte character of CLIP's (and the synthetic) vocabulary: id 0
            (folder / name / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}, indent=2))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}, indent=2))
    (folder / MARKER).write_text("written by bench/gpu_check.py: random weights, for timing only\n")
    return folder


def photo(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A fixed random RGB image (its content does not change the cost of any stage)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------- processes

def run_process(argv: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT) -> dict:
    """Run `argv` in its own session (so that a timeout stops its children too, e.g. torchrun's workers);
    returns rc (None when stopped at `timeout`), output (stdout + stderr) and seconds."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this call started: the process and its children
            proc.wait()
            rc = None
        out.seek(0)
        return dict(rc=rc, output=out.read(), seconds=time.perf_counter() - t0)


def tail(text: str, lines: int = 1) -> str:
    """The last non-empty lines of a process's output (its error, usually)."""
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(kept[-lines:])[:300] if kept else "(no output)"


def stopped(r: dict) -> str:
    """Why a run_process result is not a success: its time limit, or its exit code and last output line."""
    return "stopped at its time budget" if r["rc"] is None else f"exit code {r['rc']}: {tail(r['output'])}"


def pytest_env() -> dict:
    """The environment of the pytest run: strict mode off, so that a missing reference library is a skip
    (with its reason) rather than a failure."""
    return {k: v for k, v in os.environ.items() if k not in ("MINIDIFFSEG_STRICT_TESTS", "CI")}


# ---------------------------------------------------------------------------------------- step 1

def _without_cuda(cond: ast.AST) -> bool:
    """Whether a skip condition is true on a machine without CUDA: `not torch.cuda.is_available()`, a
    comparison of torch.cuda's counts (`device_count() < 2`), an `or` holding one, a NO_CUDA-like name.
    (`skipif(torch.cuda.is_available())` skips WITH CUDA: not a CUDA test.)"""
    text = ast.unparse(cond).lower()
    if "cuda" not in text:
        return False
    if isinstance(cond, ast.UnaryOp) and isinstance(cond.op, ast.Not) or isinstance(cond, ast.Compare):
        return True
    if isinstance(cond, ast.BoolOp):
        return isinstance(cond.op, ast.Or) and any(_without_cuda(v) for v in cond.values)
    return isinstance(cond, (ast.Name, ast.Attribute)) and ("no_cuda" in text or "without_cuda" in text)


def _names_cuda(node: ast.AST, aliases: frozenset[str] = frozenset()) -> bool:
    """Whether a decorator or pytestmark expression asks for CUDA: a skipif on a condition true without CUDA,
    a mark named cuda/gpu (pytest.mark.cuda, pytest.mark.gpu), or a module-level name bound to one of these."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in ("cuda", "gpu") and "mark" in ast.unparse(sub.value):
            return True
        if isinstance(sub, ast.Call) and ast.unparse(sub.func).endswith("skipif") and sub.args and \
                _without_cuda(sub.args[0]):
            return True
        if isinstance(sub, ast.Name) and sub.id in aliases:
            return True
    return False


def _skips_in_body(fn: ast.AST) -> bool:
    """`if not torch.cuda.is_available(): pytest.skip(...)` (or any condition true without CUDA) in a test."""
    return any(isinstance(n, ast.If) and _without_cuda(n.test) and
               any(isinstance(c, ast.Call) and ast.unparse(c.func).endswith("skip") for b in n.body
                   for c in ast.walk(b)) for n in ast.walk(fn))


def cuda_tests(tests: Path = ROOT / "tests") -> list[str]:
    """Node ids (tests/FILE.py::NAME, or ::CLASS::NAME) of the tests that skip without CUDA or are marked for
    it, read from the sources (nothing is imported): decorators on the function or its class, a skip in its
    body under a no-CUDA condition, or a module-level `pytestmark`."""
    found = []
    for path in sorted(Path(tests).glob("test_*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        aliases = frozenset(t.id for n in tree.body if isinstance(n, ast.Assign) and _names_cuda(n.value)
                            for t in n.targets if isinstance(t, ast.Name) and t.id != "pytestmark")
        module = any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in n.targets)
                     and _names_cuda(n.value, aliases) for n in tree.body)
        rel = path.relative_to(Path(tests).parent).as_posix()

        def visit(body, prefix: str, marked: bool):
            for n in body:
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test"):
                    if marked or any(_names_cuda(d, aliases) for d in n.decorator_list) or _skips_in_body(n):
                        found.append(f"{prefix}::{n.name}")
                elif isinstance(n, ast.ClassDef) and n.name.startswith("Test"):
                    visit(n.body, f"{prefix}::{n.name}",
                          marked or any(_names_cuda(d, aliases) for d in n.decorator_list))

        visit(tree.body, rel, module)
    return found


def run_pytest(nodes: list[str], timeout: float, cwd: Path = ROOT) -> dict:
    """pytest on `nodes` in a subprocess; the counts and each case's outcome from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        run = run_process([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           f"--junitxml={xml}", *nodes], timeout, env=pytest_env(), cwd=cwd)
        cases = []
        if xml.is_file():
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome, message = "passed", ""
                for child in case:
                    if child.tag in ("failure", "error", "skipped"):
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                        message = (child.get("message") or child.text or "").strip().splitlines()[0:1]
                        message = message[0][:200] if message else ""
                        break
                cases.append(dict(test=f"{case.get('classname', '')}::{case.get('name', '')}", outcome=outcome,
                                  message=message))
    # a module skipped at import (a missing reference library) is "collection skipped" in the XML; the reason
    # is in the -rs summary: "SKIPPED [1] tests/assets.py:46: diffusers is needed by this test ..."
    reasons = re.findall(r"^SKIPPED \[\d+\] \S+?:\d+: (.+)$", run["output"], re.M)
    for c in cases:
        if c["outcome"] == "skipped" and c["message"] in ("", "collection skipped") and len(reasons) == 1:
            c["message"] = reasons[0][:200]
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return dict(run, cases=cases, reasons=reasons, **counts)


def step_tests(ctx: Context, res: StepResult) -> None:
    nodes = cuda_tests()
    res.notes.append("found in tests/ (skipif on cuda, or a cuda/gpu mark): " + (", ".join(nodes) or "none"))
    if not nodes:
        res.status = "skipped: no CUDA tests found"
        return
    r = run_pytest(nodes, timeout=min(STEP_BUDGET_S["tests"], ctx.left() - 5))
    rows = res.table("pytest " + " ".join(nodes), ["test", "outcome", "message"])
    rows += [dict(test=c["test"], outcome=c["outcome"], message=c["message"]) for c in r["cases"]]
    res.facts.update({k: r[k] for k in ("passed", "failed", "error", "skipped")})
    summary = f"{r['passed']} passed, {r['failed']} failed, {r['error']} errors, {r['skipped']} skipped"
    res.notes.append(f"pytest exit code {r['rc']}: {summary} in {r['seconds']:.1f} s")
    if r["rc"] is None:
        res.status = f"failed: pytest stopped at its time budget ({summary} by then)"
    elif r["failed"] or r["error"] or (r["rc"] not in (0, 5) and not r["cases"]):
        res.status = f"failed: {summary}" + ("" if r["cases"] else f" ({tail(r['output'])})")
    elif r["passed"] == 0:
        reasons = sorted({c["message"] for c in r["cases"] if c["outcome"] == "skipped"} | set(r["reasons"]))
        res.status = f"skipped: pytest skipped all ({'; '.join(reasons)[:300]})"
    else:
        res.status = f"ok: {summary}"


# ---------------------------------------------------------------------------------------- step 2

SEGMENT_CHILD = r"""
import sys, torch
from minidiffseg.cli import main
rc = main(sys.argv[1:])
print("GPU_CHECK cuda_bytes", torch.cuda.max_memory_allocated() if torch.cuda.is_available() else -1, flush=True)
sys.exit(rc)
"""


def step_segment(ctx: Context, res: StepResult) -> None:
    """`minidiffseg segment` (the CLI's main, in a fresh process) without --device; the process reports the
    CUDA memory it allocated afterwards, which says which device the command chose."""
    from safetensors.torch import load_file

    weights = tiny_weights(ctx)
    work = Path(ctx.work) / "segment"
    image, out = photo(work / "photo.png", (96, 64)), work / "out"
    argv = [sys.executable, "-c", SEGMENT_CHILD, "segment", str(image), "--classes", ",".join(CLASSES),
            "--weights", str(weights), "--out", str(out)] + (["--resolution", str(DRY_RES)] if ctx.dry_run else [])
    res.notes.append("command: minidiffseg " + " ".join(argv[3:]).replace(str(ctx.work), "WORK")
                     .replace(str(weights), "TINY"))
    r = run_process(argv, timeout=min(STEP_BUDGET_S["segment"], ctx.left() - 5))
    found = re.search(r"GPU_CHECK cuda_bytes (-?\d+)", r["output"])
    cuda_bytes = int(found.group(1)) if found else None
    device = ("cuda" if cuda_bytes and cuda_bytes > 0 else "cpu") if cuda_bytes is not None else NOT_MEASURED
    expected = ["photo_mask.png", "photo_overlay.png", "photo_scores.safetensors",
                *[f"photo_heat_{i}_{c}.png" for i, c in enumerate(CLASSES, 1)]]
    missing = [f for f in expected if not (out / f).is_file()]
    finite = NOT_MEASURED
    if not missing:
        scores = load_file(out / "photo_scores.safetensors")
        finite = "yes" if all(bool(t.float().isfinite().all()) for t in scores.values()) else "no"
    problems = []
    if r["rc"] != 0:
        problems.append(stopped(r))
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if ctx.cuda and device != "cuda":
        problems.append(f"the default device was {device}, not cuda")
    if finite == "no":
        problems.append("scores not finite")
    res.table("one 96×64 image, C = 4, tiny random weights", ["exit code", "default device", "CUDA memory",
                                                               "outputs", "scores finite", "seconds", "status"]).append(
        {"exit code": str(r["rc"]), "default device": device,
         "CUDA memory": f"{cuda_bytes / 2**20:.1f} MiB" if cuda_bytes and cuda_bytes > 0 else NOT_MEASURED,
         "outputs": f"{len(expected) - len(missing)}/{len(expected)}", "scores finite": finite,
         "seconds": f"{r['seconds']:.1f}", "status": "failed: " + "; ".join(problems) if problems else "ok"})
    res.status = "failed: " + "; ".join(problems) if problems else "ok"


# ---------------------------------------------------------------------------------------- step 3

class StageTimer:
    """`with timer("fuse"): ...` adds the block's milliseconds to `times`: on CUDA from events recorded after
    a synchronize (the GPU's time for the block, as bench/measure.py's Clock does), else perf_counter."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        self.times[stage] = self.times.get(stage, 0.0) + ms


STAGES = ["prompts", "encode_text", "encode_image", "noises", "record", "fuse", "refine", "post-process"]


def stages(seg, image, classes: list[str], timer: StageTimer) -> dict:
    """One image through the Segmenter's steps, as bench/ours.py `stages` calls them (text cache emptied
    first, so the text is encoded); returns every map for the finiteness check."""
    import torch

    from minidiffseg.image import to_tensor
    from minidiffseg.method.decision import decide, upsample_scores

    generator = torch.Generator().manual_seed(0)
    seg.text_cache.clear()
    with torch.inference_mode():
        with timer("prompts"):
            rows = seg.prompts(classes)
        with timer("encode_text"):
            context = seg.encode_text(rows)  # states (C, 77, 768)
        with timer("encode_image"):
            z0 = seg.encode_image(to_tensor(image, torch.promote_types(seg.dtype, torch.float32)), generator)
        with timer("noises"):
            noises = seg.noises(z0, generator)
        with timer("record"):  # the class-map columns over every text token the denoiser reads (SD3: 77 + 256)
            store = seg.record(z0, noises, context, seg.columns(rows, context.states.shape[1])[1])
        with timer("fuse"):  # A (C, 1, 64, 64): the latent's grid (SD1.5), the token grid (SD3: latent / 2)
            fused, _, _ = seg.fuse(store, seg.map_size(z0))
        with timer("refine"):
            refined = seg.refine(store, fused)  # M (C, 1, 64, 64)
        with timer("post-process"):
            scores = upsample_scores(refined.flatten(0, 1), (image.height, image.width))
            decide(scores, seg.default_tau)
    return {"text embeddings": context.states, "latent": z0, "fused A": fused, "refined M": refined, "scores": scores}


def end_to_end(seg, image, classes: list[str], cuda: bool, clear_text: bool):
    """`seg(image, classes)` (its results come back on the CPU): (milliseconds, result)."""
    if clear_text:
        seg.text_cache.clear()
    timer = StageTimer(cuda)
    with timer("call"):
        r = seg(image, classes, seed=0)
    return timer.times["call"], r


def not_finite(maps: dict) -> list[str]:
    return [name for name, t in maps.items() if not bool(t.float().isfinite().all())]


def ms(x: float | None) -> str:
    return NOT_MEASURED if x is None else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def measure_setting(ctx: Context, weights: Path, dtype_name: str, stream: bool, image,
                    resolution: int | None = None) -> dict:
    """Load, one warm-up image stage by stage, then --repeats timed images stage by stage, --repeats whole calls
    with the text encoded and --repeats with it cached; peak memory from the reset after loading; the dtype the
    VAE encoder computed in (a forward pre-hook on it: float32 for a `force_upcast` VAE under fp16)."""
    import gc

    import torch

    from minidiffseg.cli.options import DTYPES
    from minidiffseg.method.segmenter import Segmenter

    cuda = ctx.device == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = Segmenter.from_pretrained(weights, device=ctx.device, dtype=DTYPES[dtype_name], stream=stream,
                                        resolution=resolution or ctx.resolution)
        vae_dtypes: set[str] = set()
        encoder = getattr(getattr(seg.sd, "vae", None), "encoder", None)
        if encoder is not None:
            encoder.register_forward_pre_hook(lambda _, args: vae_dtypes.add(str(args[0].dtype).replace("torch.", "")))
        if cuda:
            torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        after_load = torch.cuda.memory_allocated() if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        per_stage, bad = [], set()
        for i in range(1 + ctx.repeats):
            timer = StageTimer(cuda)
            maps = stages(seg, image, CLASSES, timer)
            bad.update(not_finite(maps))
            if i:
                per_stage.append(timer.times)
        calls, cached = [], []  # warm already: the stage runs above ran every kernel of the call
        for _ in range(ctx.repeats):
            t, r = end_to_end(seg, image, CLASSES, cuda, clear_text=True)
            calls.append(t)
        for _ in range(ctx.repeats):
            t, _ = end_to_end(seg, image, CLASSES, cuda, clear_text=False)
            cached.append(t)
        bad.update(f"call: {n}" for n in not_finite({"scores": r.scores, "fused A": r.fused, "refined M": r.refined}))
        peak = torch.cuda.max_memory_allocated() if cuda else None
    del seg
    return dict(load_s=load_s, stages={s: statistics.median(t[s] for t in per_stage) for s in STAGES},
                call_ms=statistics.median(calls), cached_ms=statistics.median(cached), after_load=after_load,
                peak=peak, not_finite=sorted(bad), scores=r.scores,
                vae_dtype=", ".join(sorted(vae_dtypes)) or NOT_MEASURED,
                warnings=sorted({str(w.message).splitlines()[0] for w in caught}))


def measure_settings(ctx: Context, res: StepResult, weights: Path, image, resolution: int, setting_s: float,
                     vae_column: bool = False) -> None:
    """fp16 and bf16, each resident and `stream=True`, into the step's two tables ("milliseconds per stage
    (median)", "per setting"); a setting that fails is a row with its error's first line, one that would start
    with less than `setting_s` left is a "skipped: time budget" row; the step's status from the rows."""
    times = res.table("milliseconds per stage (median)", ["dtype", "weights", *STAGES, "sum", "status"])
    summary = res.table("per setting", ["dtype", "weights", "load s", "call ms", "call ms, text cached",
                                        "after load GiB", "peak GiB", *(["VAE dtype"] if vae_column else []),
                                        "every map finite", "max |Δ scores| vs resident", "status"])
    resident = {}
    for dtype in ("fp16", "bf16"):
        for stream in (False, True):
            label = dict(dtype=dtype, weights="stream=True" if stream else "resident")
            if ctx.left() < setting_s:
                for rows in (times, summary):
                    rows.append(dict(label, status=f"skipped: time budget ({ctx.left():.0f} s left)"))
                res.save()
                continue
            try:
                m = measure_setting(ctx, weights, dtype, stream, image, resolution)
            except Exception as e:  # noqa: BLE001 - recorded, the next setting still runs
                for rows in (times, summary):
                    rows.append(dict(label, status="failed: " + first_line(e)))
                res.save()
                continue
            if not stream:
                resident[dtype] = m["scores"]
            diff = (f"{(m['scores'] - resident[dtype]).abs().max().item():.2e}" if stream and dtype in resident
                    else NOT_MEASURED)
            gib = lambda b: NOT_MEASURED if b is None else f"{b / 2**30:.2f}"  # noqa: E731
            ok = "ok" if not m["not_finite"] else "failed: not finite: " + ", ".join(m["not_finite"])
            times.append(dict(label, **{s: ms(m["stages"][s]) for s in STAGES}, sum=ms(sum(m["stages"].values())),
                              status=ok))
            summary.append(dict(label, **{"load s": f"{m['load_s']:.1f}", "call ms": ms(m["call_ms"]),
                                          "call ms, text cached": ms(m["cached_ms"]),
                                          "after load GiB": gib(m["after_load"]),
                                          "peak GiB": gib(m["peak"]), "VAE dtype": m["vae_dtype"],
                                          "every map finite": "yes" if not m["not_finite"] else "no",
                                          "max |Δ scores| vs resident": diff, "status": ok}))
            res.facts[f"{dtype}-{'stream' if stream else 'resident'}"] = dict(call_ms=m["call_ms"],
                                                                              cached_ms=m["cached_ms"])
            res.notes += [f"{dtype}, {label['weights']}: warning: {w}" for w in m["warnings"]]
            res.save()
    statuses = [r["status"] for r in summary]
    bad = [f"{r['dtype']} {r['weights']}: {r['status']}" for r in summary if r["status"] != "ok"]
    res.status = "ok" if not bad else ("failed: " if any(s.startswith("failed") for s in statuses) else "partial: ") + \
        "; ".join(bad)[:300]


def step_pipeline(ctx: Context, res: StepResult) -> None:
    from PIL import Image

    t0 = time.perf_counter()
    if ctx.dry_run:
        weights = tiny_weights(ctx)
        res.notes.append(f"weights: tiny random SD1.5 at {DRY_RES}² (dry run: the figures mean nothing)")
    else:
        fresh = not (Path(ctx.cache) / "sd15-random-fp16" / MARKER).is_file()
        weights = write_random_sd(Path(ctx.cache) / "sd15-random-fp16", tiny=False)
        res.notes.append(f"weights: full-size random SD1.5, the hub's .fp16 files (bench/gpu_check.py write_random_sd; "
                         f"{'written' if fresh else 'found'} in {time.perf_counter() - t0:.1f} s): same shapes, "
                         "kernels and FLOPs as the real ones")
    image = Image.open(photo(Path(ctx.work) / "pipeline" / "photo.png", (ctx.resolution,) * 2)).convert("RGB")
    clock = "CUDA events, synchronized before each stage" if ctx.device == "cuda" else "perf_counter"
    res.notes.append(f"image {ctx.resolution}×{ctx.resolution}, classes {', '.join(CLASSES)}; one warm-up, then the "
                     f"median of {ctx.repeats}; stage times from {clock}; "
                     "\"call\": the whole `Segmenter.__call__` per image (text encoded; \"cached\": the same classes' "
                     "text embeddings from its cache); memory: torch.cuda.max_memory_allocated, reset after loading")
    measure_settings(ctx, res, weights, image, ctx.resolution, SETTING_S)


# ---------------------------------------------------------------------------------------- step 4

def step_sd3(ctx: Context, res: StepResult) -> None:
    """Random SD3-medium without T5 (written once into --cache; dry run: tiny) in fp16 and bf16 at 1024², as the
    pipeline step measures SD1.5; the VAE's compute dtype beside each setting (force_upcast: float32 under fp16)."""
    from PIL import Image

    t0 = time.perf_counter()
    folder = Path(ctx.cache) / ("sd3-tiny-no-t5" if ctx.dry_run else "sd3-medium-random-fp16-no-t5")
    fresh = not (folder / MARKER).is_file()
    weights = write_random_sd3(folder, tiny=ctx.dry_run)
    written = time.perf_counter() - t0
    side = DRY_SD3_RES if ctx.dry_run else SD3_RES
    counts = {name: safetensors_params(weights / name / f"{stem}.safetensors") for name, stem in SD3_FILES.items()}
    size = sum((weights / name / f"{stem}.safetensors").stat().st_size for name, stem in SD3_FILES.items())
    what = (f"tiny random SD3 at {side}² (tests/tiny_sd3.py's sizes; dry run: the figures mean nothing)" if ctx.dry_run
            else "full-size random SD3-medium in the hub's layout (fp16 under the plain file names): same shapes, "
            "kernels and FLOPs as the real ones")
    res.notes.append(f"weights: {what} (bench/gpu_check.py write_random_sd3; "
                     + (f"{size / 1e9:.2f} GB " if size >= 1e8 else f"{size / 1e6:.1f} MB ") +
                     f"{'written' if fresh else 'found'} in {written:.1f} s); parameters: "
                     + ", ".join(f"{name} {n:,}" for name, n in counts.items()) + " (transformer: with its "
                     "position table; vae: the encoder half)")
    res.notes.append("without T5 (text_encoder_3/, tokenizer_3/ not written): T5-XXL's encoder is 4.76 B parameters, "
                     "9.5 GB in fp16, too slow to write within the check's budget. The transformer reads zeros in T5's "
                     "256 places, as `download --no-t5` runs, so its 77 + 256 = 333 text tokens cost what they cost "
                     "with T5; T5's own encoding of the C + 1 prompts is not in encode_text's time")
    image = Image.open(photo(Path(ctx.work) / "sd3" / "photo.png", (side,) * 2)).convert("RGB")
    clock = "CUDA events, synchronized before each stage" if ctx.device == "cuda" else "perf_counter"
    grid = "the tiny model's 8² tokens" if ctx.dry_run else "SD3's training size: 64² tokens"
    res.notes.append(f"image {side}×{side} ({grid}), classes {', '.join(CLASSES)}; "
                     f"one warm-up, then the median of {ctx.repeats}; stage times from {clock}; \"call\" and memory "
                     "as in the pipeline step; VAE dtype: what the VAE encoder computed in (its config says "
                     "force_upcast, so float32 under fp16, as diffusers' SD3 pipeline)")
    res.save()  # the weights' notes survive a setting that takes the process down
    measure_settings(ctx, res, weights, image, side, SD3_SETTING_S, vae_column=True)
    if ctx.device == "cuda":  # on a CPU half precision may compute in float32 anyway (minidiffseg.sd.precision)
        expected = {"fp16": "float32", "bf16": "bfloat16"}
        wrong = [f"{r['dtype']} {r['weights']}: the VAE computed in {r['VAE dtype']}, not {expected[r['dtype']]}"
                 for r in res.tables[-1]["rows"] if "VAE dtype" in r and r["VAE dtype"] != expected[r["dtype"]]]
        if wrong:
            res.status = ("failed: " if res.status == "ok" else res.status + "; ") + "; ".join(wrong)[:300]


# ---------------------------------------------------------------------------------------- step 5

def step_refine(ctx: Context, res: StepResult) -> None:
    """Random Q, K of SD1.5's five 64² self-attention layers (8 heads of 40) for C = 4 rows, one map per row,
    as bench/worker.py `run_refine` draws them."""
    import torch

    from bench.worker import HEAD_DIM, HEADS, SELF_LAYERS
    from minidiffseg.cli.options import DTYPES
    from minidiffseg.method.refine import refine, refine_naive

    cuda = ctx.device == "cuda"
    res_side = DRY_REFINE_RES if ctx.dry_run else ctx.resolution
    hw, batch = (res_side // 8) ** 2, len(CLASSES)
    g = torch.Generator().manual_seed(0)
    qk = [tuple(torch.randn(batch, HEADS, hw, HEAD_DIM, generator=g) for _ in "qk") for _ in range(SELF_LAYERS)]
    maps = torch.rand(batch, hw, 1, generator=g)
    res.notes.append(f"{res_side}² ({hw} tokens), {SELF_LAYERS} layers × {HEADS} heads of {HEAD_DIM}, "
                     f"C = {batch} rows, one map each; one warm-up, the median of {ctx.repeats}; "
                     "extra memory: max_memory_allocated during the call above what was allocated before it")
    rows = res.table(f"refinement at {res_side}²", ["method", "dtype", "ms", "extra MiB",
                                                           "max |Δ| vs naive, same dtype", "max |Δ| vs fp32 naive",
                                                           "status"])

    def run(fn, q_k, a):
        times, extra = [], None
        for i in range(1 + ctx.repeats):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            timer = StageTimer(cuda)
            with torch.inference_mode(), timer("refine"):
                out = fn(q_k, a)
            if i:
                times.append(timer.times["refine"])
            if cuda:
                extra = max(extra or 0, torch.cuda.max_memory_allocated() - before)
        return out.float().cpu(), statistics.median(times), extra

    reference = None
    for dtype in ("fp32", "fp16", "bf16"):
        if ctx.left() < 5:
            rows.append(dict(method="both", dtype=dtype, status="skipped: time budget"))
            continue
        outs = {}
        for method, fn in (("naive", refine_naive), ("fused", refine)):
            try:
                dt = DTYPES[dtype]
                q_k = [(q.to(ctx.device, dt), k.to(ctx.device, dt)) for q, k in qk]
                out, t, extra = run(fn, q_k, maps.to(ctx.device, dt))
                del q_k
                outs[method] = out
                if dtype == "fp32" and method == "naive":
                    reference = out
                rows.append(dict(method=method, dtype=dtype, ms=ms(t),
                                 **{"extra MiB": NOT_MEASURED if extra is None else f"{extra / 2**20:.1f}",
                                    "max |Δ| vs naive, same dtype": f"{(out - outs['naive']).abs().max().item():.2e}"
                                    if method == "fused" and "naive" in outs else NOT_MEASURED,
                                    "max |Δ| vs fp32 naive": f"{(out - reference).abs().max().item():.2e}"
                                    if reference is not None else NOT_MEASURED},
                                 status="ok" if bool(out.isfinite().all()) else "failed: not finite"))
            except Exception as e:  # noqa: BLE001 - recorded, the next one still runs
                rows.append(dict(method=method, dtype=dtype, status="failed: " + first_line(e)))
            res.save()
            if cuda:
                torch.cuda.empty_cache()
    bad = [f"{r['method']} {r['dtype']}: {r['status']}" for r in rows if r["status"] != "ok"]
    res.status = "ok" if not bad else "failed: " + "; ".join(bad)[:300]


# ---------------------------------------------------------------------------------------- step 6

NCCL_SCRIPT = r"""
import os, torch, torch.distributed as dist
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
t = torch.ones(4, device="cuda") * (rank + 1)
dist.all_reduce(t)
want = world * (world + 1) / 2
assert torch.all(t == want), (t, want)
dist.destroy_process_group()
print(f"GPU_CHECK nccl all_reduce ok rank {rank} world {world}", flush=True)
"""


def write_voc(root: Path, images: int = 3) -> list[str]:
    """A tiny fake VOC2012 val split (the layout tests/test_eval_datasets.py writes): 40×30 random photos and
    palette labels with two rectangles of two classes each."""
    import numpy as np
    from PIL import Image

    base = root / "VOCdevkit" / "VOC2012"
    names = [f"2007_{i:06d}" for i in range(images)]
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        photo(base / "JPEGImages" / f"{name}.jpg", (40, 30), seed=i)
        gt = np.zeros((30, 40), dtype=np.uint8)
        gt[0] = 255
        gt[5:15, 4:16], gt[16:26, 20:36] = 1 + (3 * i) % 20, 1 + (7 * i + 5) % 20
        label = Image.fromarray(gt, mode="L").convert("P")
        label.putpalette([v for j in range(256) for v in (j, 255 - j, (7 * j) % 256)])
        label.save(base / "SegmentationClass" / f"{name}.png")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    return names


def step_torchrun(ctx: Context, res: StepResult) -> None:
    import torch

    weights = tiny_weights(ctx)
    work = Path(ctx.work) / "torchrun"
    names = write_voc(work / "data")
    world = min(2, torch.cuda.device_count()) if ctx.device == "cuda" else 1
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    rows = res.table(f"torchrun, {world} process{'es' if world > 1 else ''}",
                     ["run", "backend", "exit code", "seconds", "written", "status"])
    out = work / "eval"
    argv = [*launch, "-m", "minidiffseg", "eval", "--dataset", "voc", "--root", str(work / "data"), "--weights",
            str(weights), "--out", str(out), "--resolution", str(DRY_RES)]
    res.notes.append("command: " + " ".join(["python", *argv[1:]]).replace(str(work), "WORK")
                     .replace(str(weights), "TINY") + " (no --device: cuda:LOCAL_RANK on a GPU machine)")
    if world == 1:
        res.notes.append("with one process minidiffseg's runner starts no process group (evaluation/runner.py "
                         "Ranks: only for WORLD_SIZE > 1), so its NCCL path needs 2 GPUs; the NCCL row checks the "
                         "backend through the same launcher")
    r = run_process(argv, timeout=min(STEP_BUDGET_S["torchrun"] * 0.7, ctx.left() - 5),
                    env=dict(os.environ, OMP_NUM_THREADS="1"))
    results = sorted((out / "results").glob("*.npz")) if (out / "results").is_dir() else []
    summary = out / "summary.json"
    problems = []
    if r["rc"] != 0:
        problems.append(stopped(r))
    if not summary.is_file() or len(results) != len(names):
        written = "written" if summary.is_file() else "missing"
        problems.append(f"{len(results)}/{len(names)} results, summary.json {written}")
    elif json.loads(summary.read_text()).get("images") != len(names):
        problems.append("summary.json does not count every image")
    rows.append({"run": "minidiffseg eval (voc, 3 images)",
                 "backend": ("nccl" if world > 1 else "none (world 1)") if ctx.device == "cuda" else
                 ("gloo" if world > 1 else "none (world 1)"), "exit code": str(r["rc"]),
                 "seconds": f"{r['seconds']:.1f}",
                 "written": f"{len(results)} results, summary.json {'yes' if summary.is_file() else 'no'}",
                 "status": "failed: " + "; ".join(problems) if problems else "ok"})
    res.save()
    if ctx.device != "cuda":
        rows.append({"run": "NCCL all_reduce", "backend": "nccl", "status": "skipped: no CUDA"})
    else:
        script = work / "nccl_check.py"
        script.write_text(NCCL_SCRIPT)
        n = run_process([*launch, str(script)], timeout=min(60, ctx.left() - 5))
        oks = len(re.findall(r"GPU_CHECK nccl all_reduce ok", n["output"]))
        bad = n["rc"] != 0 or oks != world
        rows.append({"run": f"NCCL all_reduce ({world} rank{'s' if world > 1 else ''})", "backend": "nccl",
                     "exit code": str(n["rc"]), "seconds": f"{n['seconds']:.1f}", "written": f"{oks}/{world} ranks ok",
                     "status": f"failed: {tail(n['output'])}" if bad else "ok"})
        problems += ["NCCL all_reduce failed"] if bad else []
    res.status = "failed: " + "; ".join(problems)[:300] if problems else "ok"


STEP_FUNCTIONS = {"tests": step_tests, "segment": step_segment, "pipeline": step_pipeline, "sd3": step_sd3,
                  "refine": step_refine, "torchrun": step_torchrun}


# ---------------------------------------------------------------------------------------- running

def run_step_here(fn, ctx: Context, res: StepResult) -> StepResult:
    """`fn(ctx, res)` in this process: an exception becomes the step's failure (its first line); what the
    step recorded before it is kept."""
    t0 = time.perf_counter()
    try:
        fn(ctx, res)
        if res.status == "not run":
            res.status = "ok"
    except Exception as e:  # noqa: BLE001 - every failure is a table row, the other steps still run
        res.status = "failed: " + first_line(e)
    res.seconds = time.perf_counter() - t0
    res.save()
    return res


def run_step_isolated(key: str, ctx: Context, budget: float) -> StepResult:
    """The step in a fresh process (`--child`), stopped after `budget` seconds; its last saved result is
    kept whatever happened to it."""
    path = Path(ctx.work) / f"step-{key}.json"
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    r = run_process([sys.executable, "-m", "bench.gpu_check", "--child", key, "--context", json.dumps(asdict(ctx)),
                     "--result", str(path)], timeout=budget)
    res = StepResult.load(path) if path.is_file() else StepResult(key)
    res.seconds = time.perf_counter() - t0
    if r["rc"] is None:
        res.status = f"failed: stopped at its time budget ({budget:.0f} s); rows measured by then are kept"
    elif r["rc"] != 0 or res.status == "not run":
        res.status = f"failed: its process ended with exit code {r['rc']}: {tail(r['output'])}"
    return res


def execute(ctx: Context, keys: list[str], out: Path, header: dict, isolate: bool = True,
            functions: dict | None = None) -> list[StepResult]:
    """Run the steps in order within the budget, rewriting the report after each."""
    functions = functions or STEP_FUNCTIONS
    results = [StepResult(k, status="pending") for k in keys]
    for i, key in enumerate(keys):
        left = ctx.left()
        if key in NEEDS_CUDA and not (ctx.cuda and not ctx.dry_run):
            res = StepResult(key, status="skipped: no CUDA" + (" (dry run)" if ctx.cuda else ""), seconds=0.0)
            if key == "tests":
                res.notes.append("would run: " + (", ".join(cuda_tests()) or "none found"))
        elif left < MIN_START_S:
            res = StepResult(key, status=f"skipped: time budget ({max(left, 0):.0f} s left of {header['budget_s']} s)",
                             seconds=0.0)
        elif isolate:
            res = run_step_isolated(key, ctx, min(STEP_BUDGET_S[key] * (3 if ctx.dry_run else 1), left - 3))
        else:
            res = run_step_here(functions[key], ctx, StepResult(key))
        results[i] = res
        header["elapsed_s"] = time.time() - header["start"]
        write_report(out, header, results)
        print(f"[{i + 1}/{len(keys)}] {key}: {res.status} ({res.seconds or 0:.1f} s)", flush=True)
    return results


# ---------------------------------------------------------------------------------------- report

def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def source_digest() -> str:
    """sha256 of minidiffseg/ and bench/ sources (path + bytes): names the code measured where the copy has no
    .git (a device machine's copy of the working tree)."""
    h = hashlib.sha256()
    for path in sorted([*ROOT.glob("minidiffseg/**/*.py"), *ROOT.glob("bench/*.py")]):
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def commit() -> str:
    """`git rev-parse --short HEAD`, with "(dirty)" when the tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout here: pass --commit)"
    return head + (" (dirty: uncommitted changes)" if dirty else "")


def goal_line(results: list[StepResult], dry_run: bool) -> str:
    pipeline = next((r for r in results if r.key == "pipeline"), None)
    m = (pipeline.facts.get("fp16-resident") if pipeline else None) or {}
    goal = f"**Goal: C = 4 classes per image ≤ {GOAL_MS} ms in fp16 on an H100/H200** — measured: "
    if not m:
        return goal + "not measured (the pipeline step did not measure fp16 resident)"
    verdict = "dry run on the CPU with the tiny model: not comparable" if dry_run else \
        ("met" if m["call_ms"] <= GOAL_MS else "**not met**")
    return goal + (f"{m['call_ms']:.1f} ms per image end to end (fp16, resident weights, `Segmenter.__call__` "
                   f"with the text encoded; {m['cached_ms']:.1f} ms with the classes' text cached): {verdict}")


def md_table(columns: list[str], rows: list[dict]) -> list[str]:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *["| " + " | ".join(cell(r.get(c, NOT_MEASURED)) for c in columns) + " |" for r in rows]]


def render(header: dict, results: list[StepResult]) -> str:
    lines = [f"# GPU check: {header['device']}", "",
             f"Generated by `{header['command']}`; not edited by hand. "
             + ("**Dry run**: every step on the CPU with the tiny model; the figures mean nothing." if header["dry_run"]
                else ""), "",
             "| | |", "|---|---|",
             f"| commit | {header['commit']} |",
             f"| source digest | {header['digest']} (sha256 of minidiffseg/**/*.py and bench/*.py) |",
             f"| device | {header['device']}{header.get('device_extra', '')} |",
             f"| torch | {header['torch']} (CUDA {header['cuda_version']}) |",
             f"| python | {header['python']} on {header['machine']} |",
             f"| date | {header['date']} |",
             f"| time | {header.get('elapsed_s', 0):.0f} s of the {header['budget_s']} s budget |", "",
             goal_line(results, header["dry_run"]), "",
             "## Steps", ""]
    lines += md_table(["step", "status", "seconds"],
                      [{"step": f"{STEPS.index(r.key) + 1}. {r.key}", "status": r.status,
                        "seconds": NOT_MEASURED if r.seconds is None else f"{r.seconds:.1f}"} for r in results])
    for r in results:
        lines += ["", f"## {STEPS.index(r.key) + 1}. {TITLES[r.key]}", "", f"Status: {r.status}" +
                  ("" if r.seconds is None else f" ({r.seconds:.1f} s)")]
        for t in r.tables:
            lines += ["", f"{t['title']}:", "", *md_table(t["columns"], t["rows"])]
        if r.notes:
            lines += ["", *[f"- {n}" for n in r.notes]]
    return "\n".join(lines) + "\n"


def write_report(out: Path, header: dict, results: list[StepResult]) -> str:
    text = render(header, results)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return text


def machine_header(args, cuda: bool) -> dict:
    import torch

    if cuda:
        props = torch.cuda.get_device_properties(0)
        device = torch.cuda.get_device_name(0)
        extra = f", {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible"
    else:
        device, extra = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs)", ""
    return dict(device=device, device_extra=extra, torch=torch.__version__, cuda_version=torch.version.cuda,
                python=platform.python_version(), machine=platform.machine(), dry_run=args.dry_run,
                commit=args.commit or commit(), digest=source_digest(), budget_s=args.budget,
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=" ".join(["python -m bench.gpu_check", *args.argv]), start=time.time())


# ---------------------------------------------------------------------------------------- command line

def parse_steps(text: str) -> list[str]:
    """"tests,3,refine" -> step names in STEPS order; an unknown one is an argparse error."""
    keys = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        key = STEPS[int(part) - 1] if part.isdigit() and 1 <= int(part) <= len(STEPS) else part
        if key not in STEPS:
            raise argparse.ArgumentTypeError(f"unknown step {part!r}: choose from {','.join(STEPS)} "
                                             f"(or 1-{len(STEPS)})")
        keys.append(key)
    if not keys:
        raise argparse.ArgumentTypeError("no step given")
    return [k for k in STEPS if k in keys]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="the report (default bench/results/gpu-<device>.md; dry run: "
                   "bench/.cache/gpu-check/gpu-dry-run.md)")
    p.add_argument("--steps", type=parse_steps, default=list(STEPS),
                   help=f"comma-separated steps to run, names or numbers (default all: {','.join(STEPS)})")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU with the tiny model (checks the "
                   "script and the report; steps needing CUDA are recorded as skipped)")
    p.add_argument("--budget", type=float, default=TOTAL_BUDGET_S,
                   help=f"seconds for the whole run (default {TOTAL_BUDGET_S}): steps that would start later are "
                   "skipped, each step is stopped at its own budget (tests 120, segment 90, pipeline 240, sd3 180, "
                   "refine 60, torchrun 120) or the total's end")
    p.add_argument("--repeats", type=int, help="timed runs after one warm-up; the median is reported (default 3; "
                   "dry run 1)")
    p.add_argument("--cache", type=Path, default=CACHE, help="where the random weights are written once")
    p.add_argument("--commit", help="the commit measured, for a copy without .git (default: git rev-parse)")
    p.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)  # one step in this process (internal)
    p.add_argument("--context", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.child:
        ctx = Context(**json.loads(args.context))
        run_step_here(STEP_FUNCTIONS[args.child], ctx, StepResult(args.child, path=args.result))
        return 0
    if args.repeats is None:
        args.repeats = 1 if args.dry_run else 3
    if args.repeats < 1:
        print("gpu_check: error: --repeats must be at least 1", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check: error: no CUDA device is visible: run it on the GPU machine, or with --dry-run here",
              file=sys.stderr)
        return 2
    header = machine_header(args, cuda and not args.dry_run)
    out = args.out or (CACHE / "gpu-dry-run.md" if args.dry_run else
                       ROOT / "bench" / "results" / f"gpu-{slug(header['device'])}.md")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx = Context(dry_run=args.dry_run, cuda=cuda, cache=str(args.cache), work=work, repeats=args.repeats,
                      deadline=header["start"] + args.budget)
        results = execute(ctx, args.steps, out, header)
    header["elapsed_s"] = time.time() - header["start"]
    print(write_report(out, header, results))
    print(f"wrote {out}")
    return 1 if any(r.status.startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
