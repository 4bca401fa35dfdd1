"""Dataset metadata: class names, display palettes, split sizes, Cityscapes id tables.

The one home of these facts: the builders, the experiments, TensorBoard,
evaluation PNGs, the export's assets and predict all read them here.

Index i of `class_names(dataset)` / `palette(dataset)` is model class i
(the ignore label 255 is not a class). Names and colours follow the usual
references: the PASCAL VOC development kit colour map, mmsegmentation's
ADE20k table (150 classes, "other" removed by the k -> k-1 shift) and the
Cityscapes scripts' train-id colours. A model trained with another number
of classes than its dataset has (a subset, a test) gets generic names and
the VOC colour map from `class_names_for` / `palette_for`.
"""

from __future__ import annotations

import numpy as np

VOC_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

ADE20K_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# One row per class, 10 colours a row, in ADE20K_NAMES order.
_ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip

# Examples per split of the real datasets (the builders check them; the
# experiments count the reference's iterations from the training size).
SPLIT_SIZES = {
    "voc_aug": {"train": 10582, "validation": 1449},
    "ade20k": {"train": 20210, "validation": 2000},
    "cityscapes": {"train": 2975, "validation": 500},
}

# (name, label id, train id) of every Cityscapes label, as cityscapesscripts'
# labels.py; train id 255 = ignored. The license plate's -1 is 255 in a PNG.
CITYSCAPES_LABELS = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9),
    ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14),
    ("bus", 28, 15), ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16),
    ("motorcycle", 32, 17), ("bicycle", 33, 18), ("license plate", -1, 255),
)  # fmt: skip

# Cityscapes train ids 0..18, with the colours of cityscapesscripts' labels.py.
CITYSCAPES_NAMES = tuple(
    name for name, _, train_id in sorted(CITYSCAPES_LABELS, key=lambda row: row[2]) if train_id != 255
)
_CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

# The synthetic shapes (fcn_tf/data/synthetic.py draws them in this order).
SYNTHETIC_NAMES = ("background", "disc", "square", "triangle", "ring")
_SYNTHETIC_PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200))


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: uint8 (n, 3).

    Index bits are spread over the colour channels from the most significant
    bit down (bit 0 -> R, bit 1 -> G, bit 2 -> B, then the next bit plane),
    so the 256 entries are all distinct and index 255 is (224, 224, 192),
    the cream of VOC's boundary band.
    """
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


_NAMES = {
    "voc_aug": VOC_NAMES,
    "ade20k": ADE20K_NAMES,
    "cityscapes": CITYSCAPES_NAMES,
    "synthetic": SYNTHETIC_NAMES,
}


def _check(dataset: str) -> None:
    if dataset not in _NAMES:
        raise KeyError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(_NAMES)}")


def class_names(dataset: str) -> list[str]:
    """The names of the model's classes, index = class id.

    Args:
      dataset: one of "voc_aug", "ade20k", "cityscapes", "synthetic".
    """
    _check(dataset)
    return list(_NAMES[dataset])


def num_classes(dataset: str) -> int:
    """How many classes `dataset` has in model space (ignore excluded).

    Args:
      dataset: one of "voc_aug", "ade20k", "cityscapes", "synthetic".
    """
    _check(dataset)
    return len(_NAMES[dataset])


def palette(dataset: str) -> np.ndarray:
    """Display colours of the model's classes: uint8 (num_classes, 3), RGB.

    Args:
      dataset: one of "voc_aug", "ade20k", "cityscapes", "synthetic".
    """
    _check(dataset)
    if dataset == "voc_aug":
        return voc_colormap(len(VOC_NAMES))
    table = {
        "ade20k": _ADE20K_PALETTE,
        "cityscapes": _CITYSCAPES_PALETTE,
        "synthetic": _SYNTHETIC_PALETTE,
    }[dataset]
    return np.asarray(table, np.uint8)


def cityscapes_label_ids() -> np.ndarray:
    """uint8 (19,): Cityscapes train id -> official label id (the benchmark server's format)."""
    table = np.zeros(len(CITYSCAPES_NAMES), np.uint8)
    for _, label_id, train_id in CITYSCAPES_LABELS:
        if train_id != 255:
            table[train_id] = label_id
    return table


def class_names_for(dataset: str, num_classes: int, names: tuple[str, ...] = ()) -> list[str]:
    """The dataset's class names, or "class_0".. when the model has another number of classes.

    Args:
      dataset: a DataConfig.dataset value.
      num_classes: the model's classes.
      names: DataConfig.class_names (a folder dataset's own), used when given.
    """
    names = list(names) or (class_names(dataset) if dataset in _NAMES else [])
    return names if len(names) == num_classes else [f"class_{i}" for i in range(num_classes)]


def palette_for(dataset: str, num_classes: int, flat: tuple[int, ...] = ()) -> np.ndarray:
    """The dataset's uint8 (num_classes, 3) palette, or the VOC colour map when it does not fit.

    Args:
      dataset: a DataConfig.dataset value.
      num_classes: the model's classes.
      flat: DataConfig.palette (a folder dataset's own, R, G, B per class), used when given.
    """
    if flat:
        colours = np.asarray(flat, np.uint8).reshape(-1, 3)
    else:
        colours = palette(dataset) if dataset in _NAMES else np.zeros((0, 3), np.uint8)
    return colours if len(colours) == num_classes else voc_colormap(num_classes)
