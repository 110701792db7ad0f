"""Class vocabularies of the three benchmarks, in evaluation-index order, with the prompt words.

Two names per class (docs/design.md §5): the *evaluation name* (the dataset's own, whose position is
the label value in the ground-truth PNG) and the *prompt name* (the word put into the prompt). The
prompt names are the official DiffSegmenter candidate-class vocabularies (VCG-team/DiffSegmenter
`dataset/*/predict_syn_txt_*.json`); a rename never changes the evaluation classes. Renames:

  VOC       aeroplane→plane, bus→buses, diningtable→table, person→people,
            pottedplant→plant, tvmonitor→monitor
  Context   aeroplane→airplane, pottedplant→plant, tvmonitor→monitor
  COCO      airplane→aeroplane, motorcycle→motorbike, couch→sofa, potted plant→pottedplant,
            dining table→diningtable, tv→tvmonitor (the official `toothbrus` typo is not
            reproduced: the prompt says toothbrush; `toothbrus` is accepted as an alias on input)

Index 0 is `background` when the benchmark scores background as a class (VOC, Context 60,
COCO-Object): it is never prompted; it is what the background score τ predicts. Context 59 has no
background class (its background pixels are ignored, mmsegmentation's reduce_zero_label), so there
the decision is the argmax over the candidate classes alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class Vocabulary:
    name: str
    classes: tuple[str, ...]  # evaluation names; position = label value in the ground truth
    prompt_names: tuple[str, ...]  # word put into the prompt, parallel to `classes`
    template: str = "a photograph of {}"  # method/prompts.py TEMPLATES style
    background: bool = True  # classes[0] == "background": predicted by τ, never prompted
    aliases: dict[str, str] = field(default_factory=dict)  # extra accepted spelling -> eval name

    def __post_init__(self):
        assert len(self.classes) == len(self.prompt_names), (self.name, len(self.classes))
        assert not self.background or self.classes[0] == "background", self.name

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def first_thing(self) -> int:
        """Index of the first prompted class (1 with a background class, else 0)."""
        return 1 if self.background else 0

    def prompt(self, index: int) -> str:
        return self.template.format(self.prompt_names[index])

    def index(self, name: str) -> int:
        """Evaluation index of a class given by evaluation name, prompt name or alias."""
        key = name.strip().lower()
        key = self.aliases.get(key, key)
        for table in (self.classes, self.prompt_names):
            if key in table:
                return table.index(key)
        raise UserError(f"class {name!r} is not in the {self.name} vocabulary; "
                        f"valid names: {', '.join(self.prompt_names[self.first_thing:])}")


def _vocab(name, pairs, template, background=True, aliases=None) -> Vocabulary:
    """pairs: evaluation names, or "eval:prompt" where the prompt word differs."""
    evals, prompts = [], []
    for p in pairs.split():
        e, _, q = p.partition(":")
        evals.append(e.replace("_", " "))
        prompts.append((q or e).replace("_", " "))
    return Vocabulary(name, tuple(evals), tuple(prompts), template, background, aliases or {})


# PASCAL VOC 2012: the 21 classes of SegmentationClass[Aug] (values 0..20, 255 = void).
VOC = _vocab("voc", """background aeroplane:plane bicycle bird boat bottle bus:buses car cat chair
    cow diningtable:table dog horse motorbike person:people pottedplant:plant sheep sofa train
    tvmonitor:monitor""", "a photograph of {}")

# PASCAL Context 60: mmsegmentation's PascalContextDataset order (label PNG values 0..59).
_CONTEXT = """aeroplane:airplane bag bed bedclothes bench bicycle bird boat book bottle building bus
    cabinet car cat ceiling chair cloth computer cow cup curtain dog door fence floor flower food
    grass ground horse keyboard light motorbike mountain mouse person plate platform
    pottedplant:plant road rock sheep shelves sidewalk sign sky snow sofa table track train tree
    truck tvmonitor:monitor wall water window wood"""
CONTEXT = _vocab("context", "background " + _CONTEXT, "a photography of {}")
# Context 59: the same minus background; label value v in the PNG becomes v-1, 0 becomes 255.
CONTEXT59 = _vocab("context59", _CONTEXT, "a photography of {}", background=False)

# COCO-Object: background + the 80 COCO things in category-id order (GroupViT's conversion of
# COCO-Stuff 164k: things 1..80, stuff -> 0, 255 = unlabelled).
COCO_OBJECT = _vocab("coco-object", """background person bicycle car motorcycle:motorbike
    airplane:aeroplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter
    bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie
    suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard
    surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich
    orange broccoli carrot hot_dog pizza donut cake chair couch:sofa potted_plant:pottedplant bed
    dining_table:diningtable toilet tv:tvmonitor laptop mouse remote keyboard cell_phone microwave
    oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush""",
    "a photography of {}", aliases={"toothbrus": "toothbrush"})

VOCABULARIES = {"voc": VOC, "context": CONTEXT, "context59": CONTEXT59, "coco-object": COCO_OBJECT}
ALIASES = {"coco": "coco-object", "coco_object": "coco-object", "context60": "context"}


def get_vocabulary(name: str) -> Vocabulary:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in VOCABULARIES:
        raise UserError(f"unknown vocabulary {name!r}; valid: {', '.join(VOCABULARIES)} "
                        f"(or 'coco'), or a vocabulary file with one class per line")
    return VOCABULARIES[key]


def load_vocabulary(path: str | Path, template: str = "a photograph of {}") -> Vocabulary:
    """A vocabulary file: one class per line, `name` or `name: prompt name`; blank lines and lines
    starting with # are skipped. Index 0 is background (prepended unless the file starts with it)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read vocabulary file {path}: {e}; give a UTF-8 text file") from None
    evals: list[str] = []
    prompts: list[str] = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, prompt = line.partition(":")
        name, prompt = " ".join(name.split()).lower(), " ".join(prompt.split()).lower()
        if not name:
            raise UserError(f"{path}:{n}: empty class name; write `name` or `name: prompt name`")
        if name in evals:
            raise UserError(f"{path}:{n}: class {name!r} is listed twice; list each class once")
        evals.append(name)
        prompts.append(prompt or name)
    if not evals or evals == ["background"]:
        raise UserError(f"vocabulary file {path} lists no class; write one class name per line")
    if evals[0] != "background":
        evals.insert(0, "background")
        prompts.insert(0, "background")
    if "background" in evals[1:]:
        raise UserError(f"{path}: 'background' may only be the first class (it is index 0)")
    return Vocabulary(path.stem, tuple(evals), tuple(prompts), template)
