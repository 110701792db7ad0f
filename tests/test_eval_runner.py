"""The evaluation runner end to end on synthetic datasets with stub segmenters: a perfect one
(fed the ground truth) scores 1.0, a constant one the hand-computed mIoU; a run killed mid-way
resumes to the identical summary segmenting each image once; torchrun with 2 processes (gloo)
gives the identical confusion matrix to one process.

Run as a script, this file is the subprocess those tests start:
    python tests/test_eval_runner.py KIND ROOT OUT LOG [lossy | hang:N]   (also under torchrun)
hang:N: the N-th image is logged, then the segmenter waits for ever (the test kills it): no timing involved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # for the script mode
from test_eval_datasets import A_PX, B_PX, BG_PX, write_dataset  # noqa: E402

from minidiffseg.errors import UserError  # noqa: E402
from minidiffseg.evaluation.candidates import from_ground_truth  # noqa: E402
from minidiffseg.evaluation.datasets import open_dataset  # noqa: E402
from minidiffseg.evaluation.report import summarize, write_report  # noqa: E402
from minidiffseg.evaluation.runner import Ranks, run, score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TAU = 0.5


class Perfect:
    """Knows every image's ground truth: refined = the one-hot class maps at the image size, so
    upsampling is the identity and argmax over [τ, maps] returns the label."""

    def __init__(self, ds, log: Path | None = None, hang_at: int | None = None):
        self.vocab, self.log, self.hang_at, self.calls = ds.vocab, log, hang_at, 0
        self.truth = {ds.image(s).tobytes(): (s.name, ds.label(s)) for s in ds.samples}

    def __call__(self, image, classes, *, seed):
        name, gt = self.truth[image.tobytes()]
        self.calls += 1
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{os.environ.get('RANK', 0)} {name}\n")
        while self.calls == self.hang_at:
            time.sleep(1)  # until the test kills this process
        maps = [torch.from_numpy(gt == self.vocab.index(c)).float() for c in classes]
        return SimpleNamespace(refined=torch.stack(maps))  # (C, H, W)


class Constant:
    """Every class map zero (exactly zero after upsampling and min-max; a constant like 0.7 would
    pick up rounding noise in bilinear interpolation that min-max blows up to [0, 1]): τ > 0
    predicts background everywhere and, without a background class, the argmax is the first
    candidate."""

    def __call__(self, image, classes, *, seed):
        return SimpleNamespace(refined=torch.zeros(len(classes), 4, 4))


def evaluate(ds, out, model, taus=(TAU,), **kw) -> dict:
    res = run(lambda: model, ds, out, from_ground_truth(ds), taus=list(taus), progress=False,
              settings={"dataset": ds.kind, "model": type(model).__name__}, **kw)
    tau = taus[0] if ds.vocab.background else None
    summary = summarize(ds, res["conf"][0], tau=tau, tau_source="test", settings={},
                        segmented=res["segmented"], seconds=res["seconds"], world=1)
    return {**res, "summary": summary}


KINDS = ["voc", "context", "context59", "coco-object"]


@pytest.mark.parametrize("kind", KINDS)
def test_perfect_segmenter_scores_one(tmp_path, kind):
    write_dataset(tmp_path / "data", kind)
    ds = open_dataset(kind, tmp_path / "data")
    r = evaluate(ds, tmp_path / "out", Perfect(ds))
    assert r["summary"]["miou"] == 1.0 and r["summary"]["pixel_accuracy"] == 1.0, r["summary"]
    assert r["segmented"] == len(ds.samples)


@pytest.mark.parametrize("kind", KINDS)
def test_constant_segmenter_scores_the_hand_computed_value(tmp_path, kind):
    write_dataset(tmp_path / "data", kind)
    ds = open_dataset(kind, tmp_path / "data")
    miou = evaluate(ds, tmp_path / "out", Constant())["summary"]["miou"]
    if kind == "context59":
        # images (a,b) = (5,9), (9,59), (1,33) -> 59-class (4,8), (8,58), (0,32); all labelled
        # pixels go to the first candidate: IoU4 = 120/280, IoU8 = 120/440, IoU0 = 120/280, 58 and 32: 0
        expected = (A_PX / (A_PX + B_PX) * 2 + A_PX / (2 * A_PX + 2 * B_PX - A_PX)) / 5
    else:
        # background everywhere: IoU_bg = 880/(880+120+160), five classes present at IoU 0
        expected = BG_PX / (BG_PX + A_PX + B_PX) / 6
    assert miou == round(expected, 6), (miou, expected)  # the summary rounds to 6 decimals


def test_tau_sweep_and_pseudo_label_masks(tmp_path):
    write_dataset(tmp_path / "data", "voc")
    ds = open_dataset("voc", tmp_path / "data")
    r = evaluate(ds, tmp_path / "out", Perfect(ds), taus=(0.5, 0.0, 1.0), masks=True)
    conf = r["conf"]
    assert conf.shape == (3, 21, 21)
    assert (np.diag(conf[0]).sum() == conf[0].sum()) and (conf[2][:, 1:] == 0).all()  # τ=1: all bg
    mask = np.array(Image.open(tmp_path / "out" / "masks" / f"{ds.samples[0].name}.png"))
    gt = ds.label(ds.samples[0])
    assert ((mask == gt) | (gt == 255)).all()


def test_a_missing_result_or_bad_label_fails_with_the_image_name(tmp_path):
    names = write_dataset(tmp_path / "data", "voc")
    ds = open_dataset("voc", tmp_path / "data")
    out = tmp_path / "out"
    evaluate(ds, out, Perfect(ds))
    (out / "results" / f"{names[1]}.npz").unlink()
    with pytest.raises(UserError, match=f"image {names[1]} has no result"):
        score(ds, list(ds.samples), out, [TAU], progress=False)
    with pytest.raises(UserError, match="other settings \\(model: 'Perfect' there, 'Constant' now\\)"):
        evaluate(ds, out, Constant())
    label = tmp_path / "data" / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{names[2]}.png"
    Image.open(label).crop((0, 0, 40, 20)).save(label)
    with pytest.raises(UserError, match=f"is 40x20 but image {names[2]} is 40x30"):
        evaluate(ds, tmp_path / "out2", Constant())


def _script(*args, torchrun=False) -> list[str]:
    if torchrun:  # this Python's torchrun, whatever `torchrun` on PATH is
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, *args]
    return [sys.executable, __file__, *args]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_killed_run_resumes_to_the_identical_summary(tmp_path):
    pairs = [(1 + i % 20, 1 + (i * 7) % 20) for i in range(12)]
    pairs = [(a, b if b != a else 1 + b % 20) for a, b in pairs]
    write_dataset(tmp_path / "data", "voc", pairs)
    out, log1, log2, err = tmp_path / "out", tmp_path / "log1", tmp_path / "log2", tmp_path / "stderr"
    with open(err, "w") as f:  # the child's output, for the failure messages
        proc = subprocess.Popen(_script("voc", str(tmp_path / "data"), str(out), str(log1), "hang:5"), env=_env(),
                                stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600  # only a hung child gets here; the fifth image comes in seconds

    def logged() -> list[str]:
        return [line.split()[1] for line in log1.read_text().splitlines()] if log1.exists() else []

    while len(logged()) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(logged()) == 5 and proc.poll() is None, f"exit code {proc.poll()}, {logged()}:\n{err.read_text()}"
    proc.send_signal(signal.SIGKILL)  # while the fifth image is being segmented
    proc.wait()
    done = {p.stem for p in (out / "results").glob("*.npz")}
    assert done == set(logged()[:4]), (sorted(done), logged(), err.read_text())
    with open(err, "w") as f:
        rerun = subprocess.run(_script("voc", str(tmp_path / "data"), str(out), str(log2)), env=_env(), stdout=f,
                               stderr=subprocess.STDOUT)
    assert rerun.returncode == 0, err.read_text()
    second = [line.split()[1] for line in log2.read_text().splitlines()]
    assert len(second) == len(set(second)) and set(second) == {f"2007_{i:06d}" for i in range(12)} - done

    ds = open_dataset("voc", tmp_path / "data")
    whole = evaluate(ds, tmp_path / "whole", Perfect(ds))["summary"]
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["run"]["segmented_now"] == 12 - len(done)
    assert {k: v for k, v in resumed.items() if k != "run"} == \
        json.loads(json.dumps({k: v for k, v in whole.items() if k != "run"}))


def test_torchrun_two_processes_give_the_single_process_confusion(tmp_path):
    pairs = [(1 + i % 20, 1 + (i + 5) % 20) for i in range(7)]  # odd count: shards of 4 and 3
    write_dataset(tmp_path / "data", "voc", pairs)
    # a "perfect" segmenter would give a diagonal matrix for any sharding: use a lossy one
    out, log = tmp_path / "out", tmp_path / "log"
    r = subprocess.run(_script("voc", str(tmp_path / "data"), str(out), str(log), "lossy", torchrun=True),
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"torchrun exit code {r.returncode}:\n{r.stdout}\n{r.stderr}"
    by_rank = {}
    for line in log.read_text().splitlines():
        rank, name = line.split()
        by_rank.setdefault(rank, []).append(name)
    assert sorted(map(len, by_rank.values())) == [3, 4], by_rank  # sharded, no padding duplicates
    assert sorted(sum(by_rank.values(), [])) == [f"2007_{i:06d}" for i in range(7)]
    ds = open_dataset("voc", tmp_path / "data")
    single = evaluate(ds, tmp_path / "single", Lossy(ds))["summary"]
    multi = json.loads((out / "summary.json").read_text())
    assert multi["confusion"] == single["confusion"] and multi["run"]["processes"] == 2
    assert multi["miou"] == single["miou"] < 1


class Lossy(Perfect):
    """The perfect maps, shifted 3 pixels to the right: imperfect, and different per image."""

    def __call__(self, image, classes, *, seed):
        r = super().__call__(image, classes, seed=seed)
        return SimpleNamespace(refined=torch.roll(r.refined, 3, dims=-1))


def main(kind, root, out, log, option=None):
    ds = open_dataset(kind, root)
    lossy = option == "lossy"
    hang_at = int(option.removeprefix("hang:")) if option and option.startswith("hang:") else None
    model = (Lossy if lossy else Perfect)(ds, Path(log), hang_at)
    ranks = Ranks()
    try:
        res = run(lambda: model, ds, out, from_ground_truth(ds), taus=[TAU], ranks=ranks,
                  settings={"dataset": ds.kind, "model": type(model).__name__})
        if ranks.rank == 0:
            write_report(out, summarize(ds, res["conf"][0], tau=TAU, tau_source="test", settings={},
                                        segmented=res["segmented"], seconds=res["seconds"],
                                        world=ranks.world))
    finally:
        ranks.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
