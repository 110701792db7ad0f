"""Label files: the official `predict_syn_txt_*.json` layout (a fixture written here, and the real
files when ../shared is present), ours (written by LabelWriter, resumable) and flat ones."""

import json

import pytest
from PIL import Image

from assets import official_labels_dir
from minidiffseg.errors import UserError
from minidiffseg.filter.filters import LabelFileFilter, make_filter
from minidiffseg.filter.labels import FORMAT, LabelWriter, image_key, read_labels
from minidiffseg.vocabularies import get_vocabulary

VOC, COCO = get_vocabulary("voc"), get_vocabulary("coco")

OFFICIAL_VOC = {  # the official layout: prompt names, absolute paths of another machine as keys
    "synonym_matching": {"/root/data/VOC2012/JPEGImages/2007_000033.jpg": ["plane", "sofa"]},
    "image_similarity": {"/root/data/VOC2012/JPEGImages/2007_000033.jpg": ["plane"],
                         "/root/data/VOC2012/JPEGImages/2007_000129.jpg": ["bicycle", "people"]},
    "text_similarity": {"/root/data/VOC2012/JPEGImages/2007_000033.jpg": ["people"],
                        "/root/data/VOC2012/JPEGImages/2007_000129.jpg": []},
}
OFFICIAL_COCO = {
    "synonym_matching": {},
    "image_similarity": {"COCO_val2014_000000182611.jpg": ["diningtable", "toothbrus"]},
    "text_similarity": {"COCO_val2014_000000182611.jpg": ["bowl", "tvmonitor"]},
}


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_official_layout_is_the_union_keyed_by_stem(tmp_path):
    labels = read_labels(write(tmp_path / "voc.json", OFFICIAL_VOC), VOC)
    # union of image_similarity and text_similarity (synonym_matching's "sofa" is not used),
    # evaluation names in vocabulary order
    assert labels == {"2007_000033": ["aeroplane", "person"], "2007_000129": ["bicycle", "person"]}
    coco = read_labels(write(tmp_path / "coco.json", OFFICIAL_COCO), COCO)
    assert coco == {"000000182611": ["bowl", "dining table", "tv", "toothbrush"]}  # 2014 name, typo read


@pytest.mark.parametrize("name, key", [
    ("/root/autodl-tmp/dataset/VOCdevkit/VOC2012/JPEGImages/2007_000033.jpg", "2007_000033"),
    (r"C:\data\VOC2012\2007_000033.jpg", "2007_000033"), ("2008_000002.jpg", "2008_000002"),
    ("COCO_val2014_000000182611.jpg", "000000182611"), ("val2017/000000182611.jpg", "000000182611")])
def test_image_key(name, key):
    assert image_key(name) == key


def test_our_layout_round_trip_and_resume(tmp_path):
    out = tmp_path / "labels.json"
    w = LabelWriter(out, VOC, "union", 0.97)
    w.add("imgs/2007_000033.jpg", {"classes": ["aeroplane", "person"], "clip": ["aeroplane"], "blip": ["person"],
                                   "caption": "a man next to a plane", "clip_scores": {"aeroplane": 0.3}})
    w.add("imgs/2007_000129.jpg", {"classes": ["bicycle"], "clip": ["bicycle"], "blip": []})
    w.save()
    data = json.loads(out.read_text())
    assert data["format"] == FORMAT and data["vocabulary"] == "voc" and not out.with_name("labels.json.tmp").exists()
    assert data["captions"] == {"2007_000033.jpg": "a man next to a plane"}
    assert read_labels(out, VOC) == {"2007_000033": ["aeroplane", "person"], "2007_000129": ["bicycle"]}

    again = LabelWriter(out, VOC, "union", 0.97)  # resume
    assert again.done("/elsewhere/2007_000033.jpg") and not again.done("2007_000042.jpg")
    with pytest.raises(UserError, match="other settings"):
        LabelWriter(out, VOC, "clip", 0.97)
    with pytest.raises(UserError, match="other settings"):
        LabelWriter(out, COCO, "union", 0.97)
    with pytest.raises(UserError, match="not a minidiffseg label file"):
        LabelWriter(write(tmp_path / "official.json", OFFICIAL_VOC), VOC, "union", 0.97)


def test_flat_layout(tmp_path):
    path = write(tmp_path / "flat.json", {"a/2007_000033.png": ["cat", "people"], "2007_000042.jpg": ["train"]})
    assert read_labels(path, VOC) == {"2007_000033": ["cat", "person"], "2007_000042": ["train"]}


@pytest.mark.parametrize("content, message", [
    ({"x.jpg": ["unicorn"]}, "unicorn"),  # not in the vocabulary
    ({"x.jpg": ["background"]}, "never prompted"),
    ({"x.jpg": "cat"}, "not a list"),
    ({}, "no image entries"),
    ([1, 2], "not a JSON object"),
])
def test_bad_label_files(tmp_path, content, message):
    with pytest.raises(UserError, match=message) as e:
        read_labels(write(tmp_path / "bad.json", content), VOC)
    assert "\n" not in str(e.value)


def test_not_json(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read label file"):
        read_labels(tmp_path / "bad.json", VOC)


def test_label_file_filter(tmp_path):
    path = write(tmp_path / "voc.json", OFFICIAL_VOC)
    filt = make_filter("labels", VOC, labels=path)
    assert isinstance(filt, LabelFileFilter)
    assert filt("/my/VOC2012/JPEGImages/2007_000033.jpg") == ["aeroplane", "person"]
    image = tmp_path / "2007_000129.jpg"
    Image.new("RGB", (8, 8)).save(image)
    with Image.open(image) as im:  # a PIL image opened from a file carries its name
        assert filt(im) == ["bicycle", "person"]
    with pytest.raises(UserError, match="no entry"):
        filt("2007_000042.jpg")
    with pytest.raises(UserError, match="without one"):
        filt(Image.new("RGB", (8, 8)))
    with pytest.raises(UserError, match="needs a label file"):
        make_filter("labels", VOC)


@pytest.mark.parametrize("file, vocabulary, count", [
    ("voc12_val.json", "voc", 1449), ("context_val.json", "context", 5104), ("coco_object_val.json", "coco", 5000)])
def test_real_official_files(file, vocabulary, count):
    vocab = get_vocabulary(vocabulary)
    labels = read_labels(official_labels_dir() / file, vocab)
    assert len(labels) == count
    assert all(labels.values()), "the union is never empty (CLIP's relative rule keeps the best class)"
    if vocabulary == "coco":
        ids = (official_labels_dir() / "coco_object_val_ids.txt").read_text().split()
        assert {image_key(i) for i in ids} == set(labels)
