"""`minidiffseg bench --tiny`: the benchmark runs on tiny random models and writes sane tables.

Timings are never asserted (they depend on the machine and its load); what is asserted does not:
every configuration finished, every stage was measured, the FLOP counts say what the two recipes do
(same U-Net work for the same batch; the official recipe runs each class as a batch of 2), and the
Markdown tables have their sections and rows. And the package's command line imports bench/ only when
`minidiffseg bench` runs.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from assets import require
from minidiffseg.cli import main

REPO = Path(__file__).resolve().parents[1]

STAGES = ["weight loading", "text encode", "VAE encode", "U-Net pass", "U-Net + capture", "fusion",
               "refinement", "post-processing", "end to end"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from assets import clip_bpe_path

    require("diffusers")  # the baseline runs on diffusers (the bench extra)
    require("transformers")  # the baseline's text encoder is transformers' CLIPTextModel
    clip_bpe_path()  # skips without open-clip-torch's BPE file (the random checkpoint's tokenizer)
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--tiny", "--device", "cpu", "--out", str(out), "--cache", str(out / "cache")])
    return code, json.loads((out / "tiny.json").read_text()), (out / "tiny.md").read_text()


def job(results, kind, **fields):
    found = [j for j in results["jobs"] if j["job"]["kind"] == kind
             and all(j["job"].get(k) == v for k, v in fields.items())]
    assert len(found) == 1, f"{len(found)} {kind} jobs with {fields}"
    return found[0]


def test_every_configuration_finished(tiny_run):
    code, results, _ = tiny_run
    errors = [j["error"] for j in results["jobs"] if "error" in j]
    assert code == 0 and not errors, errors
    assert {j["job"]["kind"] for j in results["jobs"]} == {"gemm", "refine", "ours", "baseline"}
    assert results["meta"]["tiny"] and "random tiny" in results["meta"]["weights"]


def test_every_stage_measured(tiny_run):
    _, results, _ = tiny_run
    for kind in ("ours", "baseline"):  # the baseline's "U-Net pass": diffusers' U-Net on our batch, for parity
        stages = job(results, kind)["result"]["stages"]
        assert set(stages) == set(STAGES), f"{kind}: {sorted(stages)}"
        for name, s in stages.items():
            assert s["seconds"] > 0 and s["peak_bytes"] > 0 and s["extra_bytes"] >= 0, f"{kind} {name}: {s}"
            assert len(s["all_seconds"]) == job(results, kind)["job"]["repeats"], f"{kind} {name}: {s}"
    assert job(results, "gemm")["result"]["gemm_flops"]["fp32"] > 0
    for method in ("fused", "chunked", "naive"):
        s = job(results, "refine", method=method)["result"]["stages"]["refinement"]
        assert s["seconds"] > 0 and s["flops"] > 0, f"{method}: {s}"


def test_flop_counts_match_what_each_recipe_does(tiny_run):
    _, results, _ = tiny_run
    ours, base = (job(results, k)["result"]["stages"] for k in ("ours", "baseline"))
    # the same U-Net work (batch C, nothing stored); ours skips the output head (output=False) and runs
    # the text-independent prefix (conv_in, first resnet, first self-attention) once for the C rows
    same = ours["U-Net pass"]["flops"] / base["U-Net pass"]["flops"]
    assert 0.85 < same < 1.0, f"U-Net FLOPs ours/diffusers {same:.4f}"
    # the official recipe: per class a batch [unconditional, conditional] -> twice our rows
    double = base["U-Net + capture"]["flops"] / ours["U-Net + capture"]["flops"]
    assert 1.9 < double * same < 2.1, f"baseline/ours U-Net + capture FLOPs {double:.4f}"
    assert ours["end to end"]["flops"] >= ours["U-Net + capture"]["flops"] + ours["VAE encode"]["flops"]


def test_markdown_report(tiny_run):
    _, results, md = tiny_run
    for heading in ("## Targets", "## Per stage: C=4, 128², fp32", "## Against the floor",
                    "## Where the seconds go (torch.profiler)", "## Refinement alone"):
        assert heading in md, heading
    assert "random tiny SD1.5" in md and "load average" in md and results["meta"]["machine"]["cpu"] in md
    per_stage = md.split("## Per stage")[1].split("##")[0]
    for name in [*STAGES, "capture overhead"]:
        assert f"\n| {name} | " in per_stage, name
    targets = md.split("## Targets")[1].split("##")[0]
    rows = [line for line in targets.splitlines() if line.startswith("| ") and "---" not in line][1:]
    verdicts = [line.rstrip(" |").rsplit("| ", 1)[-1] for line in rows]
    assert verdicts.count("yes") + verdicts.count("**no**") >= 4 and set(verdicts) <= {"yes", "**no**", "—"}, rows


def test_bad_weights_folder_is_one_error_line(tmp_path, capsys):
    code = main(["bench", "--weights", str(tmp_path / "absent"), "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_models_table_puts_runs_side_by_side(tiny_run, tmp_path):
    """bench/models.py: one row per model and dtype, each figure the run's own (end to end seconds, network
    FLOPs, the baseline's end to end), and where each run came from."""
    from bench import models
    from bench.report import fmt, network_flops

    _, results, _ = tiny_run
    other = json.loads(json.dumps(results))
    other["meta"]["weights"] = "random tiny SD2.1-base (figures mean nothing: checks that the benchmark runs)"
    paths = []
    for name, r in (("a.json", results), ("b.json", other)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(r))
    out = tmp_path / "models.md"
    assert models.main([*map(str, paths), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[at:] if line.startswith("| ")]
    rows = [dict(zip(cells[0], r)) for r in cells[1:]]
    assert [r["model"] for r in rows] == ["SD1.5", "SD2.1-base"], rows
    ours, base = job(results, "ours"), job(results, "baseline")
    row = rows[0]
    assert row["end to end s"] == fmt(ours["result"]["stages"]["end to end"]["seconds"])
    assert row["network GFLOP"] == fmt(network_flops(ours) / 1e9, digits=4)
    assert row["baseline end to end s"] == fmt(base["result"]["stages"]["end to end"]["seconds"])
    md = "\n".join(lines)
    assert "`a.json`" in md and "`b.json`" in md and results["meta"]["command"] in md


def test_the_command_line_imports_bench_only_when_the_command_runs():
    """Building minidiffseg's parser, and parsing a bench command line, import no bench module (from the
    repository root, where bench/ is importable)."""
    code = ("import sys; from minidiffseg.cli import build_parser; "
            "args = build_parser().parse_args(['bench', '--quick', '--device', 'cpu']); "
            "print(args.command, sorted(m for m in sys.modules if m == 'bench' or m.startswith('bench.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "bench []", done.stdout


def test_bench_help_lists_the_benchmark_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: minidiffseg bench"), out
    assert all(option in out for option in ("--quick", "--tiny", "--weights", "--sections")), out
    with pytest.raises(SystemExit) as e:
        main(["bench", "--no-such-option"])
    assert e.value.code == 2 and "--no-such-option" in capsys.readouterr().err
