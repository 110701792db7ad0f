import json

import pytest

from assets import official_labels_dir
from class_lists import COCO, CONTEXT, PROMPT_RENAMES, VOC
from minidiffseg.errors import UserError
from minidiffseg.vocabularies import get_vocabulary, load_vocabulary


def test_sizes_order_and_templates():
    voc, ctx, ctx59, coco = (get_vocabulary(n) for n in ("voc", "context", "context59", "coco"))
    assert (len(voc), len(ctx), len(ctx59), len(coco)) == (21, 60, 59, 81)
    assert voc.classes[15] == "person" and voc.prompt_names[15] == "people"  # VOC label 15
    assert voc.classes[20] == "tvmonitor" and voc.prompt(20) == "a photograph of monitor"
    assert ctx.classes[1:] == ctx59.classes and not ctx59.background
    assert ctx.classes[59] == "wood" and ctx.classes[41] == "road"
    assert coco.classes[1] == "person" and coco.classes[80] == "toothbrush"
    assert coco.prompt(coco.index("toothbrus")) == "a photography of toothbrush"
    assert coco.index("tv") == coco.index("tvmonitor") == 63


@pytest.mark.parametrize("name, things, background, renames", [
    ("voc", VOC, True, "voc"), ("context", CONTEXT, True, "context"), ("context60", CONTEXT, True, "context"),
    ("context59", CONTEXT, False, "context"), ("coco-object", COCO, True, "coco-object")])
def test_class_lists_pinned_whole(name, things, background, renames):
    """Every evaluation name at its label index and every prompt word, against tests/class_lists.py: a swap
    in the middle of a list would silently move per-class IoUs to the wrong class."""
    v = get_vocabulary(name)
    want = (["background"] if background else []) + things
    assert list(v.classes) == want, [(i, got, w) for i, (got, w) in enumerate(zip(v.classes, want)) if got != w] \
        or (len(v.classes), len(want))
    prompts = [PROMPT_RENAMES[renames].get(c, c) for c in want]
    assert list(v.prompt_names) == prompts, [(i, got, w) for i, (got, w) in enumerate(zip(v.prompt_names, prompts))
                                             if got != w]
    assert v.background == background


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UserError, match="valid: voc, context, context59, coco-object"):
        get_vocabulary("ade20k")
    with pytest.raises(UserError, match="not in the voc vocabulary"):
        get_vocabulary("voc").index("giraffe")


@pytest.mark.parametrize("name, file", [("voc", "voc12_val"), ("context59", "context_val"),
                                        ("coco", "coco_object_val")])
def test_official_prompt_vocabularies_match(name, file):
    vocab = get_vocabulary(name)
    official = set()
    for table in json.loads((official_labels_dir() / f"{file}.json").read_text()).values():
        for names in table.values():
            official.update(names)
    ours = {vocab.prompt_names[vocab.index(n)] for n in official}
    assert ours == set(vocab.prompt_names[vocab.first_thing:]), sorted(official)


def test_vocabulary_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my classes\ncat\n\ntv monitor: monitor\n")
    v = load_vocabulary(f)
    assert v.classes == ("background", "cat", "tv monitor") and v.prompt_names[2] == "monitor"
    f.write_text("\n# nothing\n")
    with pytest.raises(UserError, match="lists no class"):
        load_vocabulary(f)
    f.write_text("cat\ncat\n")
    with pytest.raises(UserError, match="listed twice"):
        load_vocabulary(f)
    with pytest.raises(UserError, match="cannot read"):
        load_vocabulary(tmp_path / "absent.txt")


@pytest.mark.parametrize("name", ["voc", "context", "context59", "coco-object"])
def test_every_name_maps_back_to_its_own_index(name):
    """A prompt name never equals another class's evaluation name (the lookup is unambiguous)."""
    v = get_vocabulary(name)
    for i, (e, p) in enumerate(zip(v.classes, v.prompt_names)):
        assert v.index(e) == i and v.index(p) == i and v.index(p.upper()) == i, (e, p)
