"""bench/gpu_check.py, the GPU check, on the CPU: its argument handling, the finder of CUDA tests, the pytest
counts, the process time limits, the random SD3 folder, the report (a failing step is a failure row and the
report is still written; a spent budget skips steps as such), and the whole dry run in a temporary folder with
diffusers and transformers made unimportable (the GPU machines have no diffusers)."""

from __future__ import annotations

import argparse
import sys
import time

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Context, StepResult


def context(tmp_path, seconds: float = 600, dry_run: bool = True) -> Context:
    return Context(dry_run=dry_run, cuda=False, cache=str(tmp_path / "cache"), work=str(tmp_path / "work"),
                   repeats=1, deadline=time.time() + seconds)


def header(tmp_path) -> dict:
    args = argparse.Namespace(dry_run=True, commit="abc1234", budget=600, argv=["--dry-run"])
    return gpu_check.machine_header(args, cuda=False)


def sections(md: str) -> dict[str, str]:
    """'## N. title' -> the text under it."""
    parts = md.split("\n## ")[1:]
    return {p.split("\n", 1)[0]: p.split("\n", 1)[1] for p in parts}


def table_rows(text: str) -> list[dict]:
    """The first Markdown table in `text` as dicts."""
    lines = text[text.index("\n|") + 1:].split("\n\n")[0].splitlines()
    cells = [[c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
             for line in lines if not line.startswith("|---")]
    return [dict(zip(cells[0], row)) for row in cells[1:]]


# ------------------------------------------------------------------------------------- arguments

def test_steps_by_name_or_number_in_run_order():
    parse = gpu_check.build_parser().parse_args
    assert parse([]).steps == gpu_check.STEPS
    assert parse(["--steps", "refine,1,segment"]).steps == ["tests", "segment", "refine"]
    assert parse(["--steps", "6"]).steps == ["torchrun"] and parse(["--steps", "sd3,3"]).steps == ["pipeline", "sd3"]
    assert parse(["--steps", "4"]).steps == ["sd3"]
    args = parse(["--dry-run", "--out", "x.md", "--budget", "60", "--repeats", "2", "--commit", "deadbee"])
    assert args.dry_run and str(args.out) == "x.md" and args.budget == 60 and args.repeats == 2
    assert args.commit == "deadbee"


@pytest.mark.parametrize("bad", ["gpu", "0", "7", ","])
def test_unknown_step_is_an_argument_error(bad, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.build_parser().parse_args(["--steps", bad])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_only_the_dry_run_runs(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "r.md")]) == 2
    assert "--dry-run" in capsys.readouterr().err and not (tmp_path / "r.md").exists()


def test_device_names_become_file_names():
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# ------------------------------------------------------------------------------------- step 1

def test_the_repositorys_cuda_test_is_found():
    found = gpu_check.cuda_tests()
    assert "tests/test_loading.py::test_cuda" in found
    assert not any(t.startswith("tests/test_gpu_check.py") for t in found)  # its skipif(cuda) skips WITH CUDA


def test_cuda_tests_are_found_by_skipif_mark_class_or_module(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_a.py").write_text(
        "import pytest, torch\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA')\n"
        "def test_skips(): pass\n"
        "@pytest.mark.cuda\n"
        "def test_marked(): pass\n"
        "@pytest.mark.skipif(sys.platform == 'win32', reason='posix')\n"
        "def test_other_skip(): pass\n"
        "def test_plain(): pass\n"
        "@pytest.mark.skipif(torch.cuda.is_available(), reason='a CPU-only check')\n"
        "def test_skips_with_cuda(): pass\n"
        "requires_cuda = pytest.mark.skipif(torch.cuda.device_count() < 2, reason='two GPUs')\n"
        "@requires_cuda\n"
        "def test_alias(): pass\n"
        "def test_body_skip():\n"
        "    if not torch.cuda.is_available():\n"
        "        pytest.skip('no CUDA')\n"
        "@pytest.mark.gpu\n"
        "class TestGpu:\n"
        "    def test_in_class(self): pass\n")
    (tests / "test_b.py").write_text("import pytest\npytestmark = pytest.mark.cuda\ndef test_module(): pass\n")
    (tests / "helper.py").write_text("import pytest\n@pytest.mark.cuda\ndef test_not_a_test_file(): pass\n")
    assert gpu_check.cuda_tests(tests) == ["tests/test_a.py::test_skips", "tests/test_a.py::test_marked",
                                           "tests/test_a.py::test_alias", "tests/test_a.py::test_body_skip",
                                           "tests/test_a.py::TestGpu::test_in_class", "tests/test_b.py::test_module"]


def test_pytest_counts_from_its_junit_report(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='not here')\n"
        "def test_skipped(): pass\n")
    (tmp_path / "test_y.py").write_text("import pytest\npytest.skip('needs a library', allow_module_level=True)\n")
    r = gpu_check.run_pytest(["test_x.py", "test_y.py"], timeout=120, cwd=tmp_path)
    assert (r["passed"], r["failed"], r["error"], r["skipped"]) == (1, 1, 0, 2), r["output"]
    outcomes = {c["test"].rsplit("::", 1)[-1]: (c["outcome"], c["message"]) for c in r["cases"]}
    assert outcomes["test_bad"][0] == "failed" and "one is not two" in outcomes["test_bad"][1]
    assert outcomes["test_skipped"] == ("skipped", "not here")
    assert "needs a library" in r["reasons"]  # a module skipped at import: the reason from pytest's -rs lines


# ------------------------------------------------------------------------------------- step 4's weights

def test_the_random_sd3_folder_loads_as_sd3_without_t5(tmp_path):
    """The tiny folder `write_random_sd3` writes (no diffusers) is what `load_sd` reads as an SD3 diffusers folder:
    T5 left out, bigG's tokenizer padding with "!", the VAE up-cast under fp16, the plain file names in fp16."""
    from safetensors import safe_open

    from minidiffseg.sd import load_sd

    folder = gpu_check.write_random_sd3(tmp_path / "sd3", tiny=True)
    assert not (folder / "text_encoder_3").exists() and not (folder / "tokenizer_3").exists()
    with safe_open(folder / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor("context_embedder.weight").dtype == torch.float16
        assert f.get_tensor("pos_embed.pos_embed").abs().max() == 1  # the sin-cos table, not 1/fan_in noise
    sd = load_sd(folder, dtype=torch.float16)
    assert type(sd).__name__ == "StableDiffusion3" and sd.kind == "sd3" and not sd.t5 and sd.resolution == 128
    assert sd.tokenizer.pad_token == "<|endoftext|>" and sd.tokenizer_2.pad_token == "!" and sd.tokenizer_2.pad_id == 0
    assert next(sd.vae.parameters()).dtype == torch.float32 and sd.dtype == torch.float16  # force_upcast
    assert gpu_check.write_random_sd3(folder, tiny=True) == folder  # written once: the marker is there


def test_the_full_size_sd3_networks_have_sd3_mediums_sizes():
    """On the meta device: the transformer 2,028,328,000 parameters + the 192² position table (56.6 M), CLIP-L with
    its projection 123.65 M, bigG with its projection 694.66 M (the hub's SD3-medium files)."""
    from minidiffseg.sd.loading import build_on_meta

    nets = gpu_check.sd3_networks(tiny=False)
    counts = {name: sum(p.numel() for p in build_on_meta(cls, cfg).parameters())
              for name, (cls, cfg, _) in nets.items()}
    assert counts["transformer"] == 2_028_328_000 + 192 ** 2 * 1536
    assert (counts["text_encoder"], counts["text_encoder_2"]) == (123_650_304, 694_659_840)
    assert nets["transformer"][2]["_class_name"] == "SD3Transformer2DModel" and nets["vae"][2]["latent_channels"] == 16
    assert nets["text_encoder_2"][2]["hidden_act"] == "gelu" and nets["text_encoder"][2]["hidden_act"] == "quick_gelu"


# ------------------------------------------------------------------------------------- processes

def test_a_process_past_its_time_is_stopped():
    t0 = time.perf_counter()
    r = gpu_check.run_process([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                              timeout=2)
    assert r["rc"] is None and "started" in r["output"] and time.perf_counter() - t0 < 30


def test_a_step_failing_in_its_process_is_recorded(tmp_path):
    """The step's exception, in its own process, becomes its status: the error's type and first line."""
    (tmp_path / "cache").write_text("a file where the weights folder should be")
    res = gpu_check.run_step_isolated("segment", context(tmp_path), budget=120)
    assert res.status.startswith("failed: ") and "Error" in res.status and "\n" not in res.status, res.status


# ------------------------------------------------------------------------------------- the report

def test_a_failing_step_is_a_failure_row_and_the_report_is_still_written(tmp_path):
    def boom(ctx, res):
        res.table("measured before the failure", ["setting", "ms", "status"]).append(
            {"setting": "first", "ms": "1.0", "status": "ok"})
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nsecond line")

    def fine(ctx, res):
        rows = res.table("results", ["setting", "ms", "status"])
        rows.append({"setting": "a", "ms": "2.0", "status": "ok"})
        rows.append(gpu_check.failed_row("setting", "b", ValueError("bad value")))

    out = tmp_path / "report" / "gpu.md"
    results = gpu_check.execute(context(tmp_path), ["segment", "refine"], out, header(tmp_path), isolate=False,
                                functions={"segment": boom, "refine": fine})
    assert [r.status for r in results] == ["failed: RuntimeError: CUDA error: an illegal memory access was encountered",
                                           "ok"]
    md = out.read_text()
    steps = {r["step"]: r["status"] for r in table_rows(md.split("## Steps")[1])}
    assert steps == {"2. segment": results[0].status, "5. refine": "ok"}
    s = sections(md)
    assert table_rows(s["2. " + gpu_check.TITLES["segment"]]) == [{"setting": "first", "ms": "1.0", "status": "ok"}]
    rows = table_rows(s["5. " + gpu_check.TITLES["refine"]])
    assert rows[1] == {"setting": "b", "ms": "—", "status": "failed: ValueError: bad value"}
    assert "second line" not in md and "commit | abc1234" in md and "not measured" in md  # the goal line


def test_a_spent_budget_skips_the_steps_and_still_writes(tmp_path):
    out = tmp_path / "gpu.md"
    results = gpu_check.execute(context(tmp_path, seconds=5), ["segment", "pipeline"], out, header(tmp_path),
                                isolate=False)
    assert all(r.status.startswith("skipped: time budget") for r in results), [r.status for r in results]
    assert "skipped: time budget" in out.read_text()


def test_the_cuda_tests_are_skipped_without_cuda(tmp_path):
    results = gpu_check.execute(context(tmp_path), ["tests"], tmp_path / "gpu.md", header(tmp_path), isolate=False)
    assert results[0].status.startswith("skipped: no CUDA")
    assert "tests/test_loading.py::test_cuda" in results[0].notes[0]


def test_the_goal_line_reports_the_fp16_time():
    res = StepResult("pipeline", status="ok", facts={"fp16-resident": {"call_ms": 87.25, "cached_ms": 60.0}})
    line = gpu_check.goal_line([res], dry_run=False)
    assert "87.2 ms" in line and "60.0 ms" in line and line.endswith(": met")
    res.facts["fp16-resident"]["call_ms"] = 140.0
    assert gpu_check.goal_line([res], dry_run=False).endswith("**not met**")


# ------------------------------------------------------------------------------------- the dry run

BLOCKED = "raise ImportError('blocked by tests/test_gpu_check.py: the GPU machines have no {}')\n"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole dry run, with diffusers and transformers unimportable in every process it starts."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    block = tmp / "block"
    for name in ("diffusers", "transformers"):
        (block / name).mkdir(parents=True)
        (block / name / "__init__.py").write_text(BLOCKED.format(name))
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", str(block))
    mp.syspath_prepend(str(block))
    for name in ("diffusers", "transformers"):
        mp.delitem(sys.modules, name, raising=False)
    try:
        out = tmp / "results" / "gpu-dry.md"
        t0 = time.perf_counter()
        code = gpu_check.main(["--dry-run", "--out", str(out), "--cache", str(tmp / "cache")])
        seconds = time.perf_counter() - t0
    finally:
        mp.undo()
    return code, out.read_text(), seconds


def test_dry_run_writes_every_step(dry_run):
    code, md, seconds = dry_run
    steps = {r["step"]: r["status"] for r in table_rows(md.split("## Steps")[1])}
    assert code == 0, steps
    assert steps == {"1. tests": "skipped: no CUDA", "2. segment": "ok", "3. pipeline": "ok", "4. sd3": "ok",
                     "5. refine": "ok", "6. torchrun": "ok"}, steps
    assert "**Dry run**" in md and "not comparable" in md and seconds < gpu_check.TOTAL_BUDGET_S


def test_dry_run_tables(dry_run):
    _, md, _ = dry_run
    s = sections(md)
    segment = table_rows(s["2. " + gpu_check.TITLES["segment"]])
    assert segment[0]["exit code"] == "0" and segment[0]["default device"] == "cpu" and segment[0]["outputs"] == "7/7"
    pipeline = s["3. " + gpu_check.TITLES["pipeline"]]
    stages = table_rows(pipeline)
    assert [(r["dtype"], r["weights"]) for r in stages] == [("fp16", "resident"), ("fp16", "stream=True"),
                                                            ("bf16", "resident"), ("bf16", "stream=True")]
    assert all(float(r[s]) >= 0 for r in stages for s in gpu_check.STAGES)
    summary = table_rows(pipeline.split("per setting:")[1])
    assert all(r["every map finite"] == "yes" and r["status"] == "ok" for r in summary)
    assert all(float(r["max |Δ scores| vs resident"]) < 1e-3 for r in summary if r["weights"] == "stream=True")
    refine = table_rows(s["5. " + gpu_check.TITLES["refine"]])
    assert {(r["method"], r["dtype"]) for r in refine} == {(m, d) for m in ("naive", "fused")
                                                           for d in ("fp32", "fp16", "bf16")}
    assert all(float(r["max |Δ| vs naive, same dtype"]) < 1e-2 for r in refine if r["method"] == "fused")
    sd3 = s["4. " + gpu_check.TITLES["sd3"]]
    stages = table_rows(sd3)
    assert [(r["dtype"], r["weights"]) for r in stages] == [("fp16", "resident"), ("fp16", "stream=True"),
                                                            ("bf16", "resident"), ("bf16", "stream=True")]
    assert all(float(r[s]) >= 0 for r in stages for s in gpu_check.STAGES)
    summary = table_rows(sd3.split("per setting:")[1])
    assert all(r["every map finite"] == "yes" and r["status"] == "ok" for r in summary), summary
    assert all(float(r["max |Δ scores| vs resident"]) < 1e-3 for r in summary if r["weights"] == "stream=True")
    assert {r["VAE dtype"] for r in summary} <= {"float32", "bfloat16"}  # a CPU computes fp16 in one of these
    assert "without T5" in sd3 and "transformer 162,560" in sd3  # the tiny MM-DiT's parameters, table included
    torchrun = table_rows(s["6. " + gpu_check.TITLES["torchrun"]])
    assert torchrun[0]["exit code"] == "0" and torchrun[0]["written"] == "3 results, summary.json yes"
    assert torchrun[1]["status"] == "skipped: no CUDA"
