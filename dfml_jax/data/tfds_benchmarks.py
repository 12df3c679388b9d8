"""The papers' benchmarks through tensorflow-datasets (``tfds.data_source``, no TensorFlow needed
to read prepared data) or a local folder, following the papers' class splits.

* ``cifar_fs``: CIFAR-100 train+test (600 images per class), the standard CIFAR-FS split of
  Bertinetto et al. (2019) by class name: 64 / 16 / 20 classes.
* ``omniglot``: ``images_background`` (TFDS ``train``) for meta-train and meta-validation (the last
  20% of its alphabets, in id order, are held out for validation), ``images_evaluation``
  (TFDS ``test``) for meta-test; grayscale, resized (28 by default), 20 images per character.
* ``cub``: ``caltech_birds2011`` train+test, classes in id order: even -> train, i % 4 == 1 ->
  validation, i % 4 == 3 -> test (100 / 50 / 50, as the BiDf-MKD code's split script).
* ``mini_imagenet``: a local folder in the Ravi-Larochelle layout (``images/`` plus
  ``train.csv``, ``val.csv``, ``test.csv`` with ``filename,label`` rows), resized to 84.

Classes with unequal image counts are truncated to the smallest count so arrays stay static
(CUB: about 41 images per class).

TFDS is always called with ``download=False`` unless ``download=True`` is passed; a dataset that
is not prepared raises :class:`DatasetNotFoundError` saying how to prepare it. Preparing
(downloading and converting) a TFDS dataset needs ``pip install tensorflow-cpu`` (not needed to
read it afterwards).
"""
from __future__ import annotations

import csv
import os
from typing import Optional, Sequence, Tuple

import numpy as np

from .core import ClassDataset, SingleTaskData

__all__ = ["DatasetNotFoundError", "cifar_fs_splits", "omniglot_splits", "cub_splits",
           "mini_imagenet_splits", "tfds_single_task", "CIFAR100_CLASSES", "CIFAR_FS_SPLITS",
           "TFDS_SINGLE_TASK"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not available locally (nothing is downloaded unless asked)."""


CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab "
    "crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard "
    "lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom "
    "oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine "
    "possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake "
    "spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor "
    "train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()
_CIFAR_FS_VAL = ("otter motorcycle television lamp crocodile shark butterfly beaver beetle tractor "
                 "flatfish maple_tree camel crab sea cattle").split()
_CIFAR_FS_TEST = ("baby bed bicycle chimpanzee fox leopard man pickup_truck plain poppy rocket rose "
                  "snail sweet_pepper table telephone wardrobe whale woman worm").split()
CIFAR_FS_SPLITS = {
    "train": tuple(c for c in CIFAR100_CLASSES if c not in _CIFAR_FS_VAL + _CIFAR_FS_TEST),
    "validation": tuple(_CIFAR_FS_VAL),
    "test": tuple(_CIFAR_FS_TEST),
}
TFDS_SINGLE_TASK = {"mnist": 10, "fashion_mnist": 10, "svhn_cropped": 10, "cifar10": 10, "cifar100": 100}


def _tfds_where(data_dir: Optional[str]) -> str:
    return data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"


def _source(name: str, split: str, data_dir: Optional[str], download: bool):
    """``tfds.data_source`` (array_record random access, no TensorFlow needed to read).

    With ``download=False`` (the default) nothing is fetched; a dataset that is not prepared
    raises :class:`DatasetNotFoundError` saying how to prepare it. With ``download=True`` TFDS
    downloads and prepares it in the ``array_record`` format (which needs ``tensorflow``).
    """
    import tensorflow_datasets as tfds

    where = _tfds_where(data_dir)
    prepare = (f"Prepare it once on a machine with internet access: `pip install tensorflow-cpu` "
               f"(TFDS needs TensorFlow to prepare data, not to read it), then either pass "
               f"download=True or run `python -c \"import tensorflow_datasets as tfds; "
               f"tfds.builder('{name}', data_dir='{where}', file_format='array_record')"
               f".download_and_prepare()\"`; then point data_dir (or TFDS_DATA_DIR) at it.")
    try:
        if download:
            return tfds.data_source(name, split=split, data_dir=data_dir, download=True,
                                    builder_kwargs={"file_format": "array_record"})
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except ImportError as e:  # preparing needs tensorflow
        raise DatasetNotFoundError(f"TFDS could not prepare '{name}': {e}. {prepare}") from e
    except Exception as e:  # tfds raises several misleading types for "not prepared"
        what = "could not be downloaded and prepared" if download else "is not prepared"
        raise DatasetNotFoundError(
            f"TFDS dataset '{name}' (split '{split}') {what} in {where}. {prepare} "
            f"({type(e).__name__}: {e})") from e


def _label_names(src, feature: str = "label") -> Optional[list]:
    """Class names from the data source's TFDS metadata, when it has real ones."""
    try:
        names = list(src.dataset_info.features[feature].names)
    except Exception:  # plain sequences (mocks) have no metadata
        return None
    return None if all(n == str(i) for i, n in enumerate(names)) else names


def _read(src, keys: Sequence[str], chunk: int = 1024):
    out = {k: [] for k in keys}
    n = len(src)
    getter = getattr(src, "__getitems__", None)
    for start in range(0, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        try:
            items = getter(idx) if getter else None
        except TypeError:  # mocked sources (tfds.testing.mock_data) lack batched reads
            getter, items = None, None
        if items is None:
            items = [src[i] for i in idx]
        for it in items:
            for k in keys:
                out[k].append(np.asarray(it[k]))
    return out


def _resize(img: np.ndarray, size: Optional[int], gray: bool) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(img.squeeze(-1) if img.ndim == 3 and img.shape[-1] == 1 else img)
    if gray:
        im = im.convert("L")
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    a = np.asarray(im)
    return a[..., None] if a.ndim == 2 else a


def _by_class(images: Sequence[np.ndarray], labels: np.ndarray, classes: Sequence[int],
              names: Sequence[str], name: str, groups=None) -> ClassDataset:
    labels = np.asarray(labels)
    per = [np.nonzero(labels == c)[0] for c in classes]
    counts = [len(p) for p in per]
    if min(counts) < 2:
        bad = [n for n, c in zip(names, counts) if c < 2]
        raise ValueError(f"{name}: classes {bad[:5]} have fewer than 2 images; the dataset is "
                         "incomplete (re-prepare it).")
    m = min(counts)
    arr = np.stack([np.stack([images[i] for i in p[:m]]) for p in per])
    return ClassDataset(arr.astype(np.uint8), names, groups, name=name)


def cifar_fs_splits(*, image_size: Optional[int] = None, data_dir: Optional[str] = None,
                    download: bool = False) -> Tuple[ClassDataset, ...]:
    """CIFAR-FS (train, validation, test) from TFDS ``cifar100`` (train + test images)."""
    data = {"image": [], "label": []}
    for split in ("train", "test"):
        d = _read(_source("cifar100", split, data_dir, download), ("image", "label"))
        data["image"] += d["image"]
        data["label"] += d["label"]
    images = [_resize(x, image_size, False) for x in data["image"]] if image_size not in (None, 32) \
        else data["image"]
    labels = np.asarray(data["label"])
    idx = {n: i for i, n in enumerate(CIFAR100_CLASSES)}
    return tuple(_by_class(images, labels, [idx[n] for n in CIFAR_FS_SPLITS[s]], list(CIFAR_FS_SPLITS[s]),
                           f"cifar_fs/{s}") for s in ("train", "validation", "test"))


def omniglot_splits(*, image_size: int = 28, data_dir: Optional[str] = None,
                    download: bool = False, val_fraction: float = 0.2) -> Tuple[ClassDataset, ...]:
    """Omniglot (train, validation, test): background alphabets (last ``val_fraction`` of them for
    validation) and evaluation alphabets, grayscale, white strokes on black, ``image_size``."""
    out = []
    for split in ("train", "test"):
        src = _source("omniglot", split, data_dir, download)
        char_names, alpha_names = _label_names(src, "label"), _label_names(src, "alphabet")
        cname = (lambda c: char_names[c]) if char_names else (lambda c: f"char{c}")
        aname = (lambda a: alpha_names[a]) if alpha_names else (lambda a: f"alphabet{a}")
        d = _read(src, ("image", "label", "alphabet"))
        imgs = [255 - _resize(x, image_size, True) for x in d["image"]]  # ink as high values
        labels, alpha = np.asarray(d["label"]), np.asarray(d["alphabet"])
        classes = sorted(set(labels.tolist()))
        alpha_of = {c: int(alpha[np.argmax(labels == c)]) for c in classes}
        if split == "train":
            alphabets = sorted(set(alpha_of.values()))
            n_val = max(1, int(round(len(alphabets) * val_fraction)))
            val_alpha = set(alphabets[-n_val:])
            for sub, keep in (("train", lambda a: a not in val_alpha), ("validation", lambda a: a in val_alpha)):
                cls = [c for c in classes if keep(alpha_of[c])]
                out.append(_by_class(imgs, labels, cls, [cname(c) for c in cls], f"omniglot/{sub}",
                                     [aname(alpha_of[c]) for c in cls]))
        else:
            out.append(_by_class(imgs, labels, classes, [cname(c) for c in classes], "omniglot/test",
                                 [aname(alpha_of[c]) for c in classes]))
    return tuple(out)


def cub_splits(*, image_size: int = 84, data_dir: Optional[str] = None,
               download: bool = False) -> Tuple[ClassDataset, ...]:
    """CUB-200-2011 (train, validation, test) = 100 / 50 / 50 classes by class-id parity."""
    data = {"image": [], "label": []}
    names = None
    for split in ("train", "test"):
        src = _source("caltech_birds2011", split, data_dir, download)
        names = names or _label_names(src)
        d = _read(src, ("image", "label"))
        data["image"] += [_resize(x, image_size, False) for x in d["image"]]
        data["label"] += d["label"]
    labels = np.asarray(data["label"])
    classes = sorted(set(labels.tolist()))
    parts = {"train": [c for i, c in enumerate(classes) if i % 2 == 0],
             "validation": [c for i, c in enumerate(classes) if i % 4 == 1],
             "test": [c for i, c in enumerate(classes) if i % 4 == 3]}
    cname = (lambda c: names[c]) if names else (lambda c: f"bird{c}")
    return tuple(_by_class(data["image"], labels, parts[s], [cname(c) for c in parts[s]], f"cub/{s}")
                 for s in ("train", "validation", "test"))


def mini_imagenet_splits(*, data_dir: Optional[str], image_size: int = 84) -> Tuple[ClassDataset, ...]:
    """MiniImageNet (train, validation, test) from a local Ravi-Larochelle folder."""
    layout = ("<data_dir>/images/<filename>.jpg and <data_dir>/{train,val,test}.csv with a header "
              "'filename,label' (Ravi & Larochelle 2017 split files)")
    if data_dir is None:
        raise DatasetNotFoundError(f"mini_imagenet needs data_dir=...: a folder laid out as {layout}")
    if not os.path.isdir(data_dir):
        raise DatasetNotFoundError(f"mini_imagenet: folder {data_dir} does not exist; expected {layout}")
    missing = [p for p in ("images", "train.csv", "val.csv", "test.csv")
               if not os.path.exists(os.path.join(data_dir, p))]
    if missing:
        raise DatasetNotFoundError(f"mini_imagenet: {data_dir} lacks {missing}; expected {layout}")
    from PIL import Image

    out = []
    for split, csv_name in (("train", "train.csv"), ("validation", "val.csv"), ("test", "test.csv")):
        with open(os.path.join(data_dir, csv_name)) as f:
            rows = [r for r in csv.reader(f)][1:]
        names = sorted({r[1] for r in rows})
        idx = {n: i for i, n in enumerate(names)}
        imgs, labels = [], []
        for fn, lab in rows:
            path = os.path.join(data_dir, "images", fn)
            if not os.path.exists(path):
                raise DatasetNotFoundError(f"mini_imagenet: {path} listed in {csv_name} is missing")
            imgs.append(np.asarray(Image.open(path).convert("RGB").resize((image_size, image_size),
                                                                          Image.BILINEAR)))
            labels.append(idx[lab])
        out.append(_by_class(imgs, np.asarray(labels), list(range(len(names))), names,
                             f"mini_imagenet/{split}"))
    return tuple(out)


def tfds_single_task(name: str, *, data_dir: Optional[str] = None, image_size: Optional[int] = None,
                     download: bool = False) -> SingleTaskData:
    """A TFDS classification dataset (train/test) as float32 NHWC in [0, 1]."""
    parts = []
    for split in ("train", "test"):
        d = _read(_source(name, split, data_dir, download), ("image", "label"))
        x = np.stack([_resize(i, image_size, False) if image_size else i for i in d["image"]])
        parts += [x.astype(np.float32) / 255.0, np.asarray(d["label"], np.int32)]
    return SingleTaskData(*parts, num_classes=TFDS_SINGLE_TASK[name], name=name)
