"""The run's report: summary.json (machine-readable) and report.md (per-class table), both written
atomically. IoU/accuracy are percentages in the Markdown and fractions in the JSON (nan -> null)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .datasets import Dataset
from .metrics import class_accuracy, iou, mean_iou, pixel_accuracy
from ..files import write_atomic

ORACLE_NOTE = ("τ swept on the evaluated split itself: an oracle upper bound, not a result "
               "(the official code reports this; we do not)")


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def summarize(ds: Dataset, conf: np.ndarray, *, tau: float | None, tau_source: str, settings: dict,
              segmented: int, seconds: float, world: int,
              sweep: tuple[list[float], np.ndarray] | None = None, crf: str = "off") -> dict:
    """conf: (n, n) confusion matrix of the reported τ; sweep: (taus, (T, n, n) matrices);
    crf: whether the reported predictions were CRF-refined, and how (docs/crf.md §7)."""
    k, vocab = len(ds.vocab), ds.vocab
    ious, accs = iou(conf), class_accuracy(conf)
    summary = {
        "dataset": ds.kind, "split": ds.split, "root": str(ds.root), "images": len(ds.samples),
        "miou": _num(mean_iou(conf, k)), "pixel_accuracy": _num(pixel_accuracy(conf)),
        "tau": {"value": tau, "source": tau_source}, "crf": crf,
        "classes": [{"index": i, "name": vocab.classes[i],
                     "prompt": vocab.prompt_names[i] if i >= vocab.first_thing else None,
                     "iou": _num(ious[i]), "accuracy": _num(accs[i]), "pixels": int(conf[i].sum())}
                    for i in range(k)],
        "settings": settings, "confusion": conf.tolist(),
        # the only part that depends on how the run went (resumed, number of processes)
        "run": {"processes": world, "segmented_now": segmented,
                "images_per_s": _num(segmented / seconds) if segmented and seconds > 0 else None},
    }
    if sweep is not None:
        taus, confs = sweep
        mious = [mean_iou(c, k) for c in confs]
        best = int(np.nanargmax(mious))
        summary["oracle_sweep"] = {"note": ORACLE_NOTE, "tau": list(taus),
                                   "miou": [_num(m) for m in mious],
                                   "best_tau": taus[best], "best_miou": _num(mious[best])}
    return summary


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def markdown(s: dict) -> str:
    tau = "not used (no background class)" if s["tau"]["value"] is None else f"{s['tau']['value']:g}"
    run = s["run"]
    speed = "–" if run["images_per_s"] is None else f"{run['images_per_s']:.3f}"
    lines = [f"# {s['dataset']} {s['split']}: mIoU {_pct(s['miou'])}", "",
             f"- images: {s['images']} ({s['root']}), segmented in this run: {run['segmented_now']} "
             f"on {run['processes']} process(es), {speed} images/s",
             f"- pixel accuracy: {_pct(s['pixel_accuracy'])}",
             f"- background τ: {tau} — {s['tau']['source']}",
             f"- dense CRF: {s.get('crf', 'off')}"]
    lines += [f"- {k}: {v}" for k, v in s["settings"].items()]
    lines += ["", "| # | class | prompt | IoU | acc | GT pixels |", "|---:|---|---|---:|---:|---:|"]
    lines += [f"| {c['index']} | {c['name']} | {c['prompt'] or '– (τ)'} | {_pct(c['iou'])} | "
              f"{_pct(c['accuracy'])} | {c['pixels']} |" for c in s["classes"]]
    lines += ["", f"**mIoU {_pct(s['miou'])}** (nan-mean over classes present in the ground truth "
              f"or the predictions; ignore label 255 left out)"]
    if "oracle_sweep" in s:
        o = s["oracle_sweep"]
        lines += ["", f"## Oracle τ sweep — {o['note']}", "", "| τ | mIoU |", "|---:|---:|"]
        lines += [f"| {t:g} | {_pct(m)} |" for t, m in zip(o["tau"], o["miou"])]
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, summary: dict) -> None:
    out = Path(out)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(out / "report.md", markdown(summary))
