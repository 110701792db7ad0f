"""`minidiffseg eval` / `calibrate` on bad inputs (one-line errors, exit code 2), label files, and
end to end with the tiny random-weight Stable Diffusion (tests/tiny_sd.py)."""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_eval_datasets import write_dataset

from minidiffseg.errors import UserError
from minidiffseg.evaluation.candidates import from_label_file
from minidiffseg.evaluation.datasets import open_dataset
from minidiffseg.evaluation.runner import predict, result_path
from minidiffseg.cli.evaluate import register


def cli(capsys, *argv: str) -> tuple[int, str]:
    """The CLI convention of minidiffseg.cli.main: UserError -> one stderr line, exit code 2. (exit code, stderr)"""
    rc, _, err = run_cli(capsys, *argv)
    return rc, err


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one command."""
    parser = argparse.ArgumentParser(prog="minidiffseg")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args([str(a) for a in argv])
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"minidiffseg: error: {e}", file=sys.stderr)
        rc = e.exit_code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip()


@pytest.fixture
def voc(tmp_path):
    write_dataset(tmp_path / "data", "voc")
    return tmp_path


def eval_args(tmp, *more):
    return ("eval", "--dataset", "voc", "--root", tmp / "data", "--weights", tmp / "no-weights",
            "--out", tmp / "out", *more)


@pytest.mark.parametrize("more, message", [
    (("--root", "/nonexistent"), "--root /nonexistent is not a directory"),
    (("--split", "test"), "split file .*test.txt not found"),
    (("--labels", "nofile.json"), "--labels nofile.json: not gt, filter or an existing label file"),
    (("--limit", "0"), "--limit 0: give a positive number"),
    (("--sweep", "0.7:0.3:0.1"), "need A <= B"),
])
def test_bad_inputs_exit_2_with_one_line(capsys, voc, more, message):
    rc, err = cli(capsys, *eval_args(voc, *more))
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("minidiffseg: error: "), err
    assert re.search(message, err), err


def test_wrong_size_label_through_the_cli(capsys, voc, tiny_sd_dir):
    label = voc / "data" / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000001.png"
    Image.open(label).crop((0, 0, 40, 20)).save(label)
    rc, err = cli(capsys, "eval", "--dataset", "voc", "--root", voc / "data", "--weights", tiny_sd_dir,
                  "--out", voc / "out", "--resolution", "64", "--device", "cpu")
    assert rc == 2 and err.splitlines()[-1].endswith("is 40x30; they must match"), err


def test_filter_without_its_weights(capsys, voc):
    rc, err = cli(capsys, *eval_args(voc, "--labels", "filter", "--clip-weights", voc / "no-clip"))
    assert rc == 2 and "no-clip" in err.splitlines()[-1], err


def test_label_file_errors(capsys, voc):
    names = [f"2007_{i:06d}" for i in range(3)]
    f = voc / "labels.json"
    f.write_text(json.dumps({n: ["cat"] for n in names[:2]}))
    rc, err = cli(capsys, *eval_args(voc, "--labels", f))
    assert rc == 2 and f"no entry for 1 image(s) of the split, e.g. {names[2]}" in err, err
    f.write_text(json.dumps({n: ["cat", "giraffe"] for n in names}))
    rc, err = cli(capsys, *eval_args(voc, "--labels", f))
    assert rc == 2 and "class 'giraffe' is not in the voc vocabulary" in err, err
    f.write_text("{not json")
    rc, err = cli(capsys, *eval_args(voc, "--labels", f))
    assert rc == 2 and "cannot read label file" in err, err


def test_tau_rules(capsys, voc, tmp_path):
    cal = tmp_path / "tau.json"
    cal.write_text(json.dumps({"tau": 0.4, "images": ["2007_000001"], "dataset": "voc", "split": "val"}))
    rc, err = cli(capsys, *eval_args(voc, "--tau-file", cal))
    assert rc == 2 and "calibrated on 1 image(s) evaluated here (e.g. 2007_000001)" in err, err
    write_dataset(tmp_path / "ctx", "context59")
    rc, err = cli(capsys, "eval", "--dataset", "context59", "--root", tmp_path / "ctx", "--weights", "w",
                  "--out", tmp_path / "o", "--tau", "0.4")
    assert rc == 2 and "no background class" in err, err


def test_official_label_file_on_coco_object(tmp_path):
    """The official COCO file spells val2017's images as COCO_val2014_<id>.jpg and uses its own
    prompt names (tvmonitor, sofa, the typo toothbrus); the recipe is image ∪ text similarity."""
    names = write_dataset(tmp_path / "data", "coco-object")
    ds = open_dataset("coco", tmp_path / "data")
    keys = [f"COCO_val2014_{n}.jpg" for n in names]
    f = tmp_path / "official.json"
    f.write_text(json.dumps({"synonym_matching": {k: ["toothbrus"] for k in keys},
                             "image_similarity": {k: ["person", "tvmonitor"] for k in keys},
                             "text_similarity": {k: ["sofa"] for k in keys}}))
    find = from_label_file(ds, f)
    vocab = ds.vocab
    assert find(ds.samples[0], None) == [vocab.index("person"), vocab.index("couch"), vocab.index("tv")]


@pytest.mark.parametrize("model", ["tiny_sd_dir", "tiny_sdxl_dir", "tiny_sd3_dir"], ids=["sd15", "sdxl", "sd3"])
def test_end_to_end_with_the_tiny_model(capsys, tmp_path, request, model):
    weights = request.getfixturevalue(model)  # SD1.5, SDXL, SD3 through the same commands, no flag between them
    names = write_dataset(tmp_path / "data", "voc", [(15, 7), (12, 15), (3, 20)])
    split = tmp_path / "data" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    (split / "train.txt").write_text(names[0] + "\n")
    (split / "val.txt").write_text("\n".join(names[1:]) + "\n")
    common = ("--dataset", "voc", "--root", tmp_path / "data", "--weights", weights, "--device", "cpu",
              "--resolution", "128")  # 16x16 latents: every code path, in seconds
    rc, out, err = run_cli(capsys, "calibrate", *common, "--out", tmp_path / "cal", "--taus", "0.2:0.8:0.2")
    assert rc == 0, err
    name = {"tiny_sdxl_dir": "SDXL (128²)", "tiny_sd3_dir": "SD3 (128², 4 blocks) with T5"}.get(model, "SD1.5")
    assert f"{name} from {weights}, at 128²" in out, out
    cal = json.loads((tmp_path / "cal" / "tau.json").read_text())
    assert cal["images"] == names[:1] and cal["tau"] in (0.2, 0.4, 0.6, 0.8)
    rc, err = cli(capsys, "eval", *common, "--out", tmp_path / "ev", "--tau-file",
                  tmp_path / "cal" / "tau.json", "--sweep", "0.2:0.8:0.2")
    assert rc == 0, err
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["images"] == 2 and s["tau"]["value"] == cal["tau"] and "calibrated" in s["tau"]["source"]
    assert 0 <= s["miou"] <= 1 and len(s["oracle_sweep"]["miou"]) == 4
    assert len(list((tmp_path / "ev" / "results").glob("*.npz"))) == 2
    # the stored maps reproduce the segmenter's own mask for the reported τ
    from minidiffseg.method.decision import upsample_scores
    from minidiffseg.method.segmenter import Segmenter
    ds = open_dataset("voc", tmp_path / "data")
    seg = Segmenter.from_pretrained(weights, template=ds.vocab.template, resolution=128)
    sample = ds.samples[1]
    with np.load(result_path(tmp_path / "ev", sample)) as r:
        classes, refined = r["classes"], r["refined"]
    gt = ds.label(sample)
    ours = predict(ds, classes, upsample_scores(torch.from_numpy(refined), gt.shape), gt.shape, cal["tau"])
    direct = seg(ds.image(sample), [ds.vocab.prompt_names[i] for i in classes], seed=0,
                 tau=cal["tau"])
    lut = np.concatenate([[0], classes])
    assert (ours == lut[direct.mask.numpy()]).all()
