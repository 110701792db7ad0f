"""The benchmarks' class lists, stated here independently of minidiffseg/vocabularies.py (test-only).

Evaluation names in label order, as the datasets define them (index i + 1 is label value i + 1 of the
ground-truth PNGs; 0 is background): PASCAL VOC 2012's 20 classes; PASCAL Context's 59 in
mmsegmentation's PascalContextDataset order; COCO's 80 thing categories in category-id order (the
COCO-Object benchmark's labels 1..80). PROMPT_RENAMES: the words the official DiffSegmenter candidate
files use where they differ from the evaluation name (every other class is prompted by its own name).
"""

VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
       "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
CONTEXT = ["aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
           "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
           "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
           "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
           "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
           "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood"]
COCO = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
        "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
        "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase",
        "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
        "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
        "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
        "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
        "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
        "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]

PROMPT_RENAMES = {
    "voc": {"aeroplane": "plane", "bus": "buses", "diningtable": "table", "person": "people",
            "pottedplant": "plant", "tvmonitor": "monitor"},
    "context": {"aeroplane": "airplane", "pottedplant": "plant", "tvmonitor": "monitor"},
    # the official file's "toothbrus" typo is deliberately not reproduced (accepted as an alias on input)
    "coco-object": {"motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa",
                    "potted plant": "pottedplant", "dining table": "diningtable", "tv": "tvmonitor"},
}

ALL_CLASSES = sorted(set(VOC + CONTEXT + COCO))
