"""A folder dataset's classes: `classes.txt` as the user writes it, and the class info a prepared one keeps.

`ROOT/classes.txt` (see `fcn_tf.data.folder`) holds one class per line,
line i is class i:

    background
    road 128 64 128          <- "name R G B": annotations are RGB PNGs in these colours
    ignore 255 255 255       <- a colour that means "ignore" (not a class)

Either every class line gives a colour or none does (then annotations are
single-channel PNGs of class indices, 255 = ignore). Names may hold spaces;
blank lines and lines starting with "#" are skipped.

Preparing writes `CLASS_INFO` beside the TFDS files
(DATA_DIR/NAME/VERSION/classes.json): names, palette, whether the
annotations were coloured, and the pixels of each class per split.
`with_dataset_classes` reads it into an experiment's config when
`experiments.resolve` runs, so that the model's class count, the evaluation
table, the export's assets and predict's colours are the user's. This
module starts no TensorFlow at import (the experiment registry imports it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re

from fcn_tf import storage
from fcn_tf.config import ConfigError, ExperimentConfig

CLASSES_FILE = "classes.txt"
CLASS_INFO = "classes.json"
VERSION = "1.0.0"
IGNORE_NAME = "ignore"
# TFDS dataset names: lower case, digits and underscores.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
RESERVED_NAMES = ("voc_aug", "ade20k", "cityscapes", "synthetic", "folder")


class ClassFileError(ValueError):
    """classes.txt cannot be read as classes; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class ClassList:
    """The classes of a folder dataset.

    Attributes:
      names: class i's name at index i.
      colours: class i's (R, G, B) at index i, or () when the annotations are
        class indices.
      ignore_colours: colours that mean "ignore" in RGB annotations.
    """

    names: tuple[str, ...]
    colours: tuple[tuple[int, int, int], ...] = ()
    ignore_colours: tuple[tuple[int, int, int], ...] = ()


def check_name(name: str) -> str:
    """Returns `name` if it can name a prepared folder dataset, else raises ValueError."""
    if not NAME_PATTERN.match(name or ""):
        raise ValueError(f"dataset name {name!r} must be lower case letters, digits and _, starting with a letter")
    if name in RESERVED_NAMES:
        raise ValueError(f"dataset name {name!r} is a built-in dataset's; choose another --name")
    return name


def _colour(parts: list[str]) -> tuple[int, int, int] | None:
    if len(parts) < 4 or not all(re.fullmatch(r"\d+", p) for p in parts[-3:]):
        return None
    rgb = tuple(int(p) for p in parts[-3:])
    return rgb if all(v <= 255 for v in rgb) else None


def parse_classes(text: str, path: str) -> ClassList:
    """Reads the text of a classes.txt (see the module docstring).

    Args:
      text: the file's contents.
      path: shown in errors.

    Raises:
      ClassFileError: fewer than 2 classes, colours on some lines only, a
        duplicated name or colour.
    """
    names, colours, ignore = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        rgb = _colour(parts)
        name = " ".join(parts[:-3]) if rgb else " ".join(parts)
        if name == IGNORE_NAME:
            if rgb is None:
                raise ClassFileError(f"{path}:{number}: an 'ignore' line needs a colour: ignore R G B")
            ignore.append(rgb)
            continue
        if name in names:
            raise ClassFileError(f"{path}:{number}: class {name!r} is listed twice")
        if rgb is not None and rgb in colours + ignore:
            raise ClassFileError(f"{path}:{number}: colour {rgb} is given twice")
        if (rgb is None) != (not colours) and names:
            raise ClassFileError(
                f"{path}:{number}: {line.strip()!r}: give a colour (name R G B) on every class line or on none"
            )
        names.append(name)
        if rgb is not None:
            colours.append(rgb)
    if len(names) < 2:
        raise ClassFileError(f"{path}: lists {len(names)} class(es); a dataset needs at least 2")
    if ignore and not colours:
        raise ClassFileError(f"{path}: 'ignore R G B' lines need class colours (RGB annotations)")
    return ClassList(tuple(names), tuple(colours), tuple(ignore))


def dataset_dir(data_dir: str, name: str) -> str:
    """DATA_DIR/NAME/VERSION, where a folder dataset is prepared (a local path or a URL)."""
    return posixpath.join(storage.normalize(data_dir), name, VERSION)


def read_class_info(data_dir: str, name: str) -> dict:
    """The class info of the prepared folder dataset NAME in `data_dir`.

    Raises:
      FileNotFoundError: NAME is not prepared there; the message gives the command.
    """
    import tensorflow as tf

    path = posixpath.join(dataset_dir(data_dir, name), CLASS_INFO)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"folder dataset {name!r} is not prepared in {data_dir} (no {path}); run: python "
            f"scripts/prepare_data.py --dataset=folder --manual_dir=ROOT --name={name} --data_dir={data_dir}"
        )
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def with_dataset_classes(config: ExperimentConfig) -> ExperimentConfig:
    """`config` with the class count, names and palette of its prepared folder dataset.

    A config that already carries class names (read back from a training
    workdir's config.json) is returned unchanged, so evaluation, export and
    predict of a trained model need no dataset.

    Raises:
      ConfigError: data.name is not set, or the dataset is not prepared.
    """
    data = config.data
    if data.dataset != "folder" or data.class_names:
        return config
    if not data.name:
        raise ConfigError(
            f"{config.name} trains on a folder dataset: pass --override=data.name=NAME (the --name given to "
            "scripts/prepare_data.py --dataset=folder)"
        )
    try:
        info = read_class_info(data.data_dir, data.name)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    names = tuple(info["class_names"])
    palette = tuple(int(v) for rgb in info["palette"] for v in rgb)
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, num_classes=len(names)),
        data=dataclasses.replace(data, class_names=names, palette=palette),
    )
