"""`minidiffseg filter` end to end with tiny random CLIP and BLIP folders in the hub layout: the
label file it writes, resuming, models loaded only when used, and bad inputs (one line, exit 2)."""

import argparse
import json

import pytest

from assets import sample_image_paths
from minidiffseg.errors import UserError
from minidiffseg.cli import filter as filter_cli
from minidiffseg.cli import main
from minidiffseg.filter.labels import read_labels
from minidiffseg.vocabularies import get_vocabulary
from test_filter_blip import save_tiny_blip  # (these two need transformers: assets.require)
from test_filter_clip import save_tiny_clip


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    clip, blip = tmp_path_factory.mktemp("clip"), tmp_path_factory.mktemp("blip")
    save_tiny_clip(clip)
    save_tiny_blip(blip)
    return clip, blip


def cli(*argv: str) -> int:
    """The `filter` command as `minidiffseg` registers it."""
    parser = argparse.ArgumentParser(prog="minidiffseg")
    filter_cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args(list(map(str, argv)))
    return args.func(args)


def test_union_label_file_and_resume(weights, tmp_path, capsys):
    clip, blip = weights
    images = sample_image_paths()[:4]
    out = tmp_path / "labels.json"
    common = ["--vocabulary", "voc", "--out", out, "--clip-weights", clip, "--blip-weights", blip, "--device", "cpu"]
    assert cli("filter", *images[:3], *common) == 0
    assert "filter" in capsys.readouterr().err  # the progress bar, on stderr
    data = json.loads(out.read_text())
    names = [p.name for p in images[:3]]
    assert list(data["image_similarity"]) == names and list(data["captions"]) == names
    vocab = get_vocabulary("voc")
    labels = read_labels(out, vocab)
    for p in images[:3]:
        clip_part, blip_part = data["image_similarity"][p.name], data["text_similarity"][p.name]
        assert clip_part, "CLIP's relative rule keeps at least the best class"
        assert labels[p.stem] == [c for c in vocab.classes if c in clip_part or c in blip_part]
        assert len(data["clip_scores"][p.name]) == 20
        assert isinstance(data["captions"][p.name], str)

    data["captions"][names[0]] = "sentinel: kept on resume"
    out.write_text(json.dumps(data))
    assert cli("filter", *images, *common) == 0
    again = json.loads(out.read_text())
    assert again["captions"][names[0]] == "sentinel: kept on resume", "done images are skipped"
    assert list(again["image_similarity"]) == names + [images[3].name]
    assert "1 images filtered (3 already there)" in capsys.readouterr().err
    assert cli("filter", *images, *common) == 0
    assert "already in" in capsys.readouterr().err


def test_clip_only_never_needs_blip(weights, tmp_path):
    clip, _ = weights
    out = tmp_path / "clip.json"
    image = sample_image_paths()[1]
    assert cli("filter", image, "--vocabulary", "coco", "--filter", "clip", "--out", out, "--clip-weights", clip,
               "--blip-weights", tmp_path / "no-such-folder", "--clip-ratio", "1.0") == 0
    data = json.loads(out.read_text())
    assert len(data["image_similarity"][image.name]) == 1, "ratio 1 keeps only the best class"
    assert data["text_similarity"][image.name] == [] and data["captions"] == {}


def test_vocabulary_file(weights, tmp_path):
    clip, blip = weights
    vocab = tmp_path / "mine.txt"
    vocab.write_text("cat\nrocket\nfire truck\n")
    out = tmp_path / "mine.json"
    assert cli("filter", *sample_image_paths()[:2], "--vocabulary", vocab, "--out", out,
               "--clip-weights", clip, "--blip-weights", blip) == 0
    classes = {c for v in json.loads(out.read_text())["image_similarity"].values() for c in v}
    assert classes and classes <= {"cat", "rocket", "fire truck"}


def bad_inputs(tmp_path, weights):
    clip, blip = weights
    image = sample_image_paths()[0]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / image.name).write_bytes(image.read_bytes())
    w = ["--clip-weights", clip, "--blip-weights", blip, "--out", tmp_path / "x.json"]
    return [
        (["filter", image, "--vocabulary", "pascal", *w], "unknown vocabulary 'pascal'"),
        (["filter", image, "--vocabulary", empty, *w], "lists no class"),
        (["filter", image, "--vocabulary", "voc", "--out", tmp_path / "y.json", "--clip-weights", tmp_path / "none"],
         "CLIP model weights not found.*openai/clip-vit-large-patch14"),
        (["filter", image, "--vocabulary", "voc", "--filter", "blip", "--out", tmp_path / "y.json",
          "--blip-weights", tmp_path / "none"], "BLIP captioner weights not found.*Salesforce/blip-image-captioning-large"),
        (["filter", tmp_path / "missing.jpg", "--vocabulary", "voc", *w], "no such file"),
        (["filter", image, other / image.name, "--vocabulary", "voc", *w], "same file name"),
        (["filter", image, "--vocabulary", "voc", "--clip-ratio", "1.5", *w], "outside"),
    ]


def test_bad_inputs_raise_one_line_user_errors(weights, tmp_path):
    for argv, message in bad_inputs(tmp_path, weights):
        with pytest.raises(UserError, match=message) as e:
            cli(*argv)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "y.json").exists(), "nothing written when the weights are missing"


def test_bad_inputs_exit_code_2_through_main(weights, tmp_path, capsys):
    """Through `minidiffseg.cli.main`, as the user runs it."""
    with pytest.raises(SystemExit) as e:
        main(["filter", "--help"])
    assert e.value.code == 0 and "--clip-weights" in capsys.readouterr().out, "`minidiffseg filter` is not registered"
    for argv, message in bad_inputs(tmp_path, weights):
        assert main(list(map(str, argv))) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("minidiffseg: error: ") and "\n" not in err and "Traceback" not in err, err
