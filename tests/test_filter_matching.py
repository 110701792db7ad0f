"""Captions -> classes for the three benchmark vocabularies: plurals, synonyms, multi-word names,
longest-phrase-first, and words that must not match (evaluation names expected)."""

import pytest

from minidiffseg.filter.matching import SYNONYMS, CaptionMatcher, singular
from minidiffseg.vocabularies import get_vocabulary, load_vocabulary

CASES = {
    "voc": [
        ("a man riding a motorcycle down a street", ["motorbike", "person"]),
        ("two women and a little girl with their dogs", ["dog", "person"]),
        ("people standing next to buses at a bus stop", ["bus", "person"]),  # "bus stop" is no bus
        ("a bus stop in the rain", []),
        ("an airplane flying over the ocean", ["aeroplane"]),
        ("a jet on the runway", ["aeroplane"]),
        ("a plane", ["aeroplane"]),
        ("a tv on a wooden table", ["diningtable", "tvmonitor"]),
        ("a television and a computer screen", ["tvmonitor"]),
        ("potted plants by the window", ["pottedplant"]),
        ("a kitten sleeping on a couch", ["cat", "sofa"]),
        ("a herd of cattle and some sheep", ["cow", "sheep"]),
        ("a hotdog stand on the corner", []),  # "hotdog" is not "dog"
        ("two hot dogs with mustard", []),  # neither is "hot dog" in VOC
        ("a teddy bear on a chair", ["chair"]),
        ("a boy on a bike next to a car", ["bicycle", "car", "person"]),
        ("a dirt bike in the mud", ["motorbike"]),  # longest phrase wins over "bike"
        ("ships in the harbor", ["boat"]),
        ("bottles of wine", ["bottle"]),
        ("a puppy and a pony", ["dog", "horse"]),
        ("a train on the train tracks", ["train"]),
        ("a catamaran", []),  # whole words only: "cat" is not in "catamaran"
        ("Dogs!", ["dog"]),
    ],
    "context": [
        ("a man riding a motorcycle down a street", ["motorbike", "person", "road"]),
        ("a train on the train tracks near a platform", ["platform", "track", "train"]),
        ("a cat laying on a laptop computer keyboard", ["cat", "computer", "keyboard"]),
        ("a computer monitor and a mouse on a desk", ["mouse", "table", "tvmonitor"]),
        ("a dog in the woods", ["dog", "tree"]),  # "woods" is a forest, not wood
        ("a pile of logs and wooden planks", ["wood"]),
        ("a plane flying over the ocean under a cloudy sky", ["aeroplane", "sky", "water"]),
        ("snowy mountains and rocks", ["mountain", "rock", "snow"]),
        ("a bedroom with a bed, pillows and a blanket", ["bed", "bedclothes"]),
        ("bookshelves full of books next to a cabinet", ["book", "cabinet", "shelves"]),
        ("curtains and windows in a building", ["building", "curtain", "window"]),
        ("a plate of food and a cup of coffee", ["cup", "food", "plate"]),
        ("a fence along the sidewalk with a stop sign", ["fence", "sidewalk", "sign"]),
        ("cows grazing on the grass in a field of flowers", ["cow", "flower", "grass"]),
        ("a hotdog stand", []),
        ("a bus at a bus stop", ["bus"]),
        ("trucks parked on the ground", ["ground", "truck"]),
        ("a lamp on the floor next to the wall", ["floor", "light", "wall"]),
        ("a bag, a bench and a door", ["bag", "bench", "door"]),
        ("cloth and clothes", ["cloth"]),
        ("a potted plant on the ceiling", ["ceiling", "pottedplant"]),
    ],
    "coco": [
        ("a hotdog stand on the sidewalk", ["hot dog"]),  # a hot dog, never a dog
        ("two hot dogs on a plate with a fork", ["fork", "hot dog"]),
        ("a dog eating a hot dog", ["dog", "hot dog"]),
        ("a teddy bear sitting on a couch next to a tv", ["couch", "tv", "teddy bear"]),
        ("a brown bear in the woods", ["bear"]),
        ("a fire hydrant in the snow", ["fire hydrant"]),
        ("a stop sign and a traffic light", ["traffic light", "stop sign"]),
        ("a man riding a motorcycle", ["person", "motorcycle"]),
        ("an aeroplane and an airplane", ["airplane"]),
        ("a bowl of oranges and bananas", ["bowl", "banana", "orange"]),  # vocabulary order
        ("a kitchen with a microwave oven and a fridge", ["microwave", "refrigerator"]),  # not "oven"
        ("a microwave next to an oven", ["microwave", "oven"]),
        ("a baseball player swinging a bat", ["person", "baseball bat"]),
        ("a catcher with a baseball glove", ["baseball glove"]),
        ("a woman holding an umbrella and a handbag", ["person", "umbrella", "handbag"]),
        ("a toothbrush in a cup", ["cup", "toothbrush"]),
        ("two skis and a snowboard", ["skis", "snowboard"]),
        ("a man on skis", ["person", "skis"]),
        ("wine glasses on a dining table", ["wine glass", "dining table"]),
        ("a glass of wine and a sandwich", ["wine glass", "sandwich"]),
        ("a girl talking on her cell phone", ["person", "cell phone"]),
        ("a man on his phone", ["person", "cell phone"]),
        ("a pair of scissors", ["scissors"]),
        ("a hair dryer and a toothbrush", ["hair drier", "toothbrush"]),
        ("potted plants by the window", ["potted plant"]),
        ("a tennis player with a racket and a ball", ["person", "sports ball", "tennis racket"]),
        ("neckties on a rack", ["tie"]),
        ("a pizza and some donuts", ["pizza", "donut"]),
        ("a dog in a suitcase", ["dog", "suitcase"]),
        ("a laptop and a computer mouse with a keyboard", ["laptop", "mouse", "keyboard"]),
        ("giraffes and zebras", ["zebra", "giraffe"]),
        ("sheep and cows", ["sheep", "cow"]),
    ],
}


@pytest.mark.parametrize("vocabulary, caption, expected",
                         [(v, c, e) for v, cases in CASES.items() for c, e in cases])
def test_caption_to_classes(vocabulary, caption, expected):
    assert CaptionMatcher(get_vocabulary(vocabulary))(caption) == expected


@pytest.mark.parametrize("plural, single", [
    ("dogs", "dog"), ("buses", "bus"), ("bus", "bus"), ("glasses", "glass"), ("benches", "bench"),
    ("boxes", "box"), ("puppies", "puppy"), ("ties", "tie"), ("knives", "knife"), ("mice", "mouse"),
    ("people", "people"), ("men", "man"), ("skis", "ski"), ("tennis", "tennis"), ("grass", "grass"),
    ("shelves", "shelf"), ("bookshelves", "bookshelf"), ("sheep", "sheep"), ("woods", "woods"), ("toothbrushes", "toothbrush")])
def test_singular(plural, single):
    assert singular(plural) == single


def test_every_class_matches_its_own_names():
    """Each class of each benchmark is found from its evaluation name, its prompt name and their
    plurals; background never is."""
    for name in ("voc", "context", "coco"):
        vocab = get_vocabulary(name)
        match = CaptionMatcher(vocab)
        for i in range(vocab.first_thing, len(vocab)):
            for text in (vocab.classes[i], vocab.prompt_names[i]):
                assert match(f"a photo of {text} here") == [vocab.classes[i]], (name, text)
        assert match("background") == []


def test_synonym_table_names_real_classes():
    every = {c for n in ("voc", "context", "context59", "coco") for c in get_vocabulary(n).classes}
    assert set(SYNONYMS) <= every, f"synonyms for unknown classes: {set(SYNONYMS) - every}"


def test_user_vocabulary_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("zebra crossing\nfire truck\ndog\n")
    match = CaptionMatcher(load_vocabulary(path))
    assert match("a dog next to a fire truck at a zebra crossing") == ["zebra crossing", "fire truck", "dog"]
    assert match("a zebra") == []
