"""Which classes of a vocabulary a caption mentions, without an NLP library.

A caption is cut into lower-case words, each reduced to a singular form by a few English plural
rules and an irregular table ("buses" -> "bus", "mice" -> "mouse", "people" stays). Every class of
the vocabulary contributes phrases (word tuples, singularised the same way): its evaluation name,
its prompt name, a readable form ("pottedplant" -> "potted plant") and its synonyms below. The
caption is then scanned left to right, taking at each word the LONGEST phrase that starts there,
so "hot dog" is the COCO class and never the dog, "teddy bear" is not a bear and "fire hydrant"
is one class. Matching is on whole words: "hotdog" does not contain "dog".

Compounds that contain a class word but name something else ("bus stop", "hot dog" where hot dog
is not a class) are consumed without a class (STOP_PHRASES). Known limits: word senses are not
told apart ("an orange cat" mentions the COCO orange; "a mouse" may be the animal).
"""

from __future__ import annotations

import re

from ..vocabularies import Vocabulary

# Readable names for the CLIP prompt and for matching, where an evaluation name glues words
READABLE = {"tvmonitor": "tv monitor", "diningtable": "dining table", "pottedplant": "potted plant",
            "bedclothes": "bed clothes"}

# Synonyms by evaluation name (VOC, Pascal Context, COCO-Object). A class known under two names
# in different benchmarks shares its list (SAME below).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("people", "man", "woman", "boy", "girl", "child", "children", "kid", "baby", "toddler",
               "guy", "lady", "gentleman", "adult", "teenager", "teen", "player", "skier", "surfer",
               "skateboarder", "snowboarder", "rider", "biker", "cyclist", "motorcyclist", "pedestrian",
               "crowd", "family", "bride", "groom", "chef", "soldier", "policeman", "police officer",
               "officer", "worker", "athlete", "tourist", "spectator", "father", "mother", "son",
               "daughter", "football player", "soccer player", "basketball player", "volleyball player"),
    "aeroplane": ("airplane", "aeroplane", "plane", "jet", "jetliner", "airliner", "aircraft", "jumbo jet"),
    "bicycle": ("bike", "bicycle", "push bike"),
    "motorbike": ("motorbike", "motorcycle", "motor bike", "dirt bike", "scooter", "moped"),
    "bird": ("duck", "goose", "swan", "seagull", "gull", "pigeon", "parrot", "owl", "eagle", "hawk",
             "chicken", "hen", "rooster", "penguin", "crow", "sparrow", "pelican", "flamingo", "heron"),
    "boat": ("ship", "sailboat", "canoe", "kayak", "yacht", "ferry", "vessel", "raft", "rowboat",
             "speedboat", "motorboat", "sail boat"),
    "bottle": ("water bottle", "beer bottle", "wine bottle"),
    "bus": ("buses", "school bus", "double decker", "double decker bus", "minibus"),
    "car": ("taxi", "cab", "suv", "sedan", "jeep", "van", "minivan", "automobile", "police car", "sports car"),
    "cat": ("kitten", "kitty"),
    "chair": ("armchair", "stool", "recliner", "high chair"),
    "cow": ("cattle", "bull", "calf", "ox", "steer"),
    "diningtable": ("table", "dining table", "desk", "kitchen table", "coffee table"),
    "dog": ("puppy", "pup", "terrier", "poodle", "retriever", "labrador", "bulldog", "dachshund",
            "chihuahua", "beagle", "husky", "sheepdog"),
    "horse": ("pony", "foal", "stallion", "mare"),
    "pottedplant": ("plant", "potted plant", "houseplant", "house plant", "flower pot", "flowerpot", "planter"),
    "sheep": ("lamb",),
    "sofa": ("couch", "sofa", "loveseat"),
    "train": ("locomotive", "tram", "subway", "trolley", "streetcar"),
    "tvmonitor": ("tv", "television", "monitor", "screen", "tv monitor", "computer monitor",
                  "computer screen", "flat screen"),
    # Pascal Context
    "bag": ("backpack", "handbag", "purse", "suitcase", "luggage", "shopping bag"),
    "bedclothes": ("blanket", "sheet", "comforter", "quilt", "duvet", "bedspread", "pillow", "bedding"),
    "bench": ("park bench",),
    "book": ("novel", "magazine"),
    "building": ("house", "skyscraper", "church", "tower", "castle", "barn", "apartment", "cathedral",
                 "temple", "hut", "cabin", "office building"),
    "cabinet": ("cupboard", "dresser", "drawer", "wardrobe"),
    "cloth": ("clothes", "clothing", "towel", "fabric", "rag"),
    "computer": ("laptop", "laptop computer", "desktop computer", "pc", "notebook computer"),
    "cup": ("mug", "coffee cup", "teacup", "coffee mug"),
    "curtain": ("drape", "drapes", "blinds"),
    "door": ("doorway", "garage door"),
    "fence": ("railing", "fencing"),
    "floor": ("carpet", "rug", "flooring", "tile floor"),
    "flower": ("bouquet", "rose", "tulip", "daisy", "sunflower"),
    "food": ("meal", "fruit", "vegetable", "dessert", "bread", "breakfast", "lunch", "dinner", "snack",
             "salad", "soup", "pizza", "sandwich", "cake"),
    "grass": ("lawn", "grassy", "turf", "meadow"),
    "ground": ("dirt", "soil", "sand", "mud", "gravel", "beach", "desert"),
    "keyboard": ("computer keyboard",),
    "light": ("lamp", "streetlight", "street light", "lantern", "chandelier", "traffic light"),
    "mountain": ("hill", "hillside", "peak"),
    "mouse": ("computer mouse",),
    "plate": ("dish",),
    "platform": ("train platform", "station platform"),
    "road": ("street", "highway", "roadway", "freeway", "intersection", "dirt road"),
    "rock": ("stone", "boulder", "cliff"),
    "shelves": ("shelf", "bookshelf", "bookcase", "shelving"),
    "sidewalk": ("pavement", "walkway", "footpath"),
    "sign": ("street sign", "stop sign", "road sign", "billboard", "signboard", "signpost"),
    "sky": ("cloud",),
    "snow": ("snowy",),
    "track": ("railway", "railroad", "rail", "train track", "railroad track", "railway track"),
    "tree": ("woods", "forest", "palm tree"),
    "truck": ("pickup", "pickup truck", "lorry", "fire truck"),
    "wall": ("brick wall",),
    "water": ("ocean", "sea", "lake", "river", "pond", "wave", "stream"),
    "window": ("windshield",),
    "wood": ("wooden", "log", "lumber", "plank"),
    # COCO-Object (its other classes share the lists above through SAME)
    "traffic light": ("stoplight", "traffic signal"),
    "fire hydrant": ("hydrant",),
    "parking meter": (),
    "bear": ("grizzly", "polar bear", "brown bear", "black bear"),
    "backpack": ("back pack", "rucksack", "knapsack"),
    "umbrella": ("parasol",),
    "handbag": ("purse", "bag", "hand bag", "shoulder bag"),
    "tie": ("necktie", "bow tie"),
    "suitcase": ("luggage", "baggage"),
    "frisbee": ("flying disc",),
    "skis": ("ski", "skiing"),
    "snowboard": ("snowboarding",),
    "sports ball": ("ball", "soccer ball", "football", "basketball", "tennis ball", "volleyball",
                    "golf ball", "beach ball"),
    "baseball bat": ("bat",),
    "baseball glove": ("glove", "mitt", "baseball mitt"),
    "skateboard": ("skate board",),
    "surfboard": ("surf board", "paddle board"),
    "tennis racket": ("racket", "racquet", "tennis racquet"),
    "wine glass": ("wineglass", "glass of wine", "champagne glass"),
    "sandwich": ("burger", "hamburger", "sub"),
    "hot dog": ("hotdog",),
    "donut": ("doughnut",),
    "cake": ("cupcake",),
    "bed": ("bunk bed",),
    "toilet": ("urinal",),
    "laptop": ("laptop computer", "notebook computer", "laptop screen"),
    "remote": ("remote control", "controller"),
    "cell phone": ("phone", "cellphone", "smartphone", "mobile phone", "telephone", "iphone"),
    "microwave": ("microwave oven",),
    "oven": ("stove",),
    "refrigerator": ("fridge", "freezer"),
    "teddy bear": ("teddy", "stuffed bear", "stuffed animal"),
    "hair drier": ("hair dryer", "hairdryer", "blow dryer", "blowdryer"),
    "toothbrush": ("tooth brush",),
}
# one class, two evaluation names: VOC/Context name -> COCO name (Context's `table` too)
SAME = {"aeroplane": "airplane", "motorbike": "motorcycle", "pottedplant": "potted plant",
        "diningtable": "dining table", "tvmonitor": "tv", "sofa": "couch"}
for _a, _b in SAME.items():
    SYNONYMS[_b] = SYNONYMS[_a]
SYNONYMS["table"] = SYNONYMS["diningtable"]

# Compounds whose head word is a class they do not name; matched (and dropped) unless the
# vocabulary has them as a class phrase (COCO's "hot dog", "teddy bear")
STOP_PHRASES = ("hot dog", "hotdog", "bus stop", "teddy bear", "train track", "railroad track",
                "train station", "sea lion", "bird house")

# Plurals the rules below would get wrong, and words that look plural but are not
IRREGULAR = {"people": "people", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
             "geese": "goose", "oxen": "ox", "teeth": "tooth", "feet": "foot", "knives": "knife",
             "leaves": "leaf", "neckties": "necktie", "buses": "bus",
             "busses": "bus", "skis": "ski", "taxis": "taxi", "woods": "woods", "series": "series", "species": "species"}


def singular(word: str) -> str:
    """A word's singular form by English plural rules: -ies -> -y (puppies; not 4-letter "ties"),
    -lves -> -lf (shelves), -sses -> -ss, -ches/-shes/-xes -> drop "es", otherwise a final s is dropped except after s, u,
    i (glass, bus, tennis). Applied to captions and class names alike, so it needs to be
    consistent rather than perfect."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("lves"):
        return word[:-3] + "f"
    if word.endswith("sses"):
        return word[:-2]
    if word.endswith(("ches", "shes", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 2:
        return word[:-1]
    return word


def words(text: str) -> tuple[str, ...]:
    """Lower-case singular words; anything but letters separates ("hot-dog" = "hot dog")."""
    return tuple(singular(w) for w in re.findall(r"[a-z]+", text.lower()))


def readable(name: str) -> str:
    return READABLE.get(name, name)


class CaptionMatcher:
    """caption -> the vocabulary's classes it mentions (evaluation names, vocabulary order)."""

    def __init__(self, vocabulary: Vocabulary):
        self.vocabulary = vocabulary
        table: dict[tuple[str, ...], str | None] = {words(p): None for p in STOP_PHRASES}
        things = range(vocabulary.first_thing, len(vocabulary))
        for own in (False, True):  # a class's own names override other classes' synonyms
            for i in things:
                name = vocabulary.classes[i]
                phrases = ((name, vocabulary.prompt_names[i], readable(name)) if own
                           else SYNONYMS.get(name, ()))
                for p in phrases:
                    table[words(p)] = name
        self.table = table
        self.longest = max(len(k) for k in table)

    def __call__(self, caption: str) -> list[str]:
        ws, found, i = words(caption), set(), 0
        while i < len(ws):
            for n in range(min(self.longest, len(ws) - i), 0, -1):  # longest phrase first
                if ws[i:i + n] in self.table:
                    if self.table[ws[i:i + n]] is not None:
                        found.add(self.table[ws[i:i + n]])
                    i += n
                    break
            else:
                i += 1
        return [c for c in self.vocabulary.classes if c in found]
