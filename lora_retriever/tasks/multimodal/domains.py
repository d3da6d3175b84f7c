"""Image domains: where the suite's images come from, what each one shows (its labels), and how it is drawn.

Every domain renders RGB images of one size, :data:`IMAGE_SIZE` x :data:`IMAGE_SIZE` (the small VLM's vision
tower is built for it). An :class:`ImageItem` is one image's identity (``key``), its structured ``labels``
(the facts a task asks about: a digit's value, a clock's hour, ...) and its ``style`` (what only changes how
it looks); :meth:`ImageDomain.render` draws it, the same pixels every time.

Domains from data shipped inside scikit-learn (``digits``: ``load_digits``; ``photo``: crops of
``load_sample_images``) live here; the procedurally drawn app screens (clock, calendar, shop, counter, map)
are in :mod:`lora_retriever.tasks.multimodal.screens`.

Each image belongs to exactly one *partition* (``train``, ``keys``, ``test``, ``heldout``), a fixed function
of the image that does not depend on any seed (:meth:`ImageDomain.partition`; see
:mod:`~lora_retriever.tasks.multimodal.partition`).
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_SIZE",
    "PARTITIONS",
    "PARTITION_SHARES",
    "DigitsDomain",
    "ImageDomain",
    "ImageItem",
    "PhotoDomain",
    "luminance",
]

IMAGE_SIZE = 64
"""Side in pixels of every image of the suite (one size for all domains). 64 = 8 x 8: a digit's 8 x 8 pixels
upscale exactly, and a patch-8 vision transformer sees 64 patches; screens are legible at this size."""

PARTITION_SHARES = {"test": 0.2, "keys": 0.1, "heldout": 0.2, "train": 0.5}
"""Expected share of each domain's images per partition (in this order on the unit interval)."""
PARTITIONS = tuple(PARTITION_SHARES)


def unit_hash(text: str) -> float:
    """A fixed position in ``[0, 1)`` for a string (SHA-256; the same on every run and platform)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def share_partition(position: float) -> str:
    """The partition whose share of the unit interval holds ``position``."""
    edge = 0.0
    for name, share in PARTITION_SHARES.items():
        edge += share
        if position < edge:
            return name
    return PARTITIONS[-1]


@dataclass(frozen=True)
class ImageItem:
    """One image of a domain, before rendering.

    Attributes:
        domain: the domain's name (``"digits"``).
        key: the image's identity within its domain; two items with one key render the same pixels.
        labels: the facts a question can ask about (``{"digit": 7}``); JSON-serialisable values.
        style: rendering-only parameters (colours, positions, the source index); JSON-serialisable.
    """

    domain: str
    key: str
    labels: Mapping[str, Any] = field(default_factory=dict)
    style: Mapping[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.domain, self.key))


class ImageDomain(ABC):
    """A family of images: how to draw a random one, what it shows, and how to render it.

    Subclasses set ``name`` and ``description`` and implement :meth:`sample` and :meth:`render`. Finite
    domains (a dataset) also override :meth:`all_items`, so a partition can be enumerated instead of sampled.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    @abstractmethod
    def sample(self, rng: random.Random) -> ImageItem:
        """One random item (of any partition)."""

    @abstractmethod
    def render(self, item: ImageItem) -> Image.Image:
        """The item's image: RGB, ``IMAGE_SIZE`` x ``IMAGE_SIZE``, deterministic."""

    def all_items(self) -> list[ImageItem] | None:
        """Every item of a finite domain, in a fixed order; ``None`` for a generated (unbounded) domain."""
        return None

    def partition(self, item: ImageItem) -> str:
        """The item's partition, a fixed function of the image (no seed): by default the share of the unit
        interval that a hash of ``(domain, key)`` falls in."""
        return share_partition(unit_hash(f"{self.name}:{item.key}"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def luminance(image: Image.Image) -> float:
    """Mean luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B) of an RGB image, in 0-255."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float((pixels @ np.array([0.299, 0.587, 0.114])).mean())


def _sklearn_datasets():
    try:
        from sklearn import datasets
    except ImportError as err:  # pragma: no cover - scikit-learn ships with the retrieval/tasks extras
        raise ImportError(
            "the multimodal task suite draws digits and photos from scikit-learn; "
            "install it with `pip install scikit-learn`"
        ) from err
    return datasets


# ----------------------------------------------------------------------------------------------------------
# digits: sklearn's 8x8 handwritten digits
# ----------------------------------------------------------------------------------------------------------


@cache
def _digit_images() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] uint8 0-255, targets [1797])`` of ``sklearn.datasets.load_digits``."""
    digits = _sklearn_datasets().load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


class DigitsDomain(ImageDomain):
    """sklearn's handwritten digits (1,797 images of 8 x 8 pixels, 16 grey levels, 10 classes), grey on
    black, upscaled to ``IMAGE_SIZE`` by pixel repetition (nearest neighbour), so each original pixel is one
    8 x 8 block.

    Labels: ``digit`` (0-9). The key is a hash of the pixels, so the few exact duplicates in the dataset
    are one item and can never sit in two partitions.
    """

    name = "digits"
    description = "a handwritten digit, grey on black (scikit-learn's digits)"

    def all_items(self) -> list[ImageItem]:
        return list(_digit_items())

    def sample(self, rng: random.Random) -> ImageItem:
        return rng.choice(_digit_items())

    def render(self, item: ImageItem) -> Image.Image:
        pixels = _digit_images()[0][item.style["index"]]
        image = Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)
        return image.convert("RGB")


@cache
def _digit_items() -> tuple[ImageItem, ...]:
    images, targets = _digit_images()
    items: dict[str, ImageItem] = {}
    for index, (pixels, digit) in enumerate(zip(images, targets)):
        key = hashlib.sha256(pixels.tobytes()).hexdigest()[:16]
        items.setdefault(key, ImageItem("digits", key, {"digit": int(digit)}, {"index": index}))
    return tuple(items.values())


# ----------------------------------------------------------------------------------------------------------
# photo: crops of sklearn's two sample photographs
# ----------------------------------------------------------------------------------------------------------

PHOTO_NAMES = ("china", "flower")
"""The two photos of ``sklearn.datasets.load_sample_images`` by file stem: a temple in China, a flower."""
PHOTO_BLOCK = 64  # crops stay inside one block of a block grid; blocks, not crops, are partitioned
PHOTO_CROP_SIZES = (40, 64)  # inclusive range of the square crop's side, in photo pixels
PHOTO_EXPOSURE = (0.3, 4.0)  # allowed brightness factor applied to a crop
BRIGHTNESS_THRESHOLD = 110.0  # mean luma above -> "bright", below -> "dark"
BRIGHTNESS_MARGIN = 15.0  # no crop is drawn within this of the threshold (its answer would be a coin toss)
BRIGHTNESS_TARGETS = {"dark": (35.0, 90.0), "bright": (130.0, 200.0)}  # mean luma a crop is exposed to


@cache
def _photos() -> dict[str, np.ndarray]:
    data = _sklearn_datasets().load_sample_images()
    by_stem = {
        name.rsplit("/", 1)[-1].rsplit(".", 1)[0]: image for name, image in zip(data.filenames, data.images)
    }
    return {name: by_stem[name] for name in PHOTO_NAMES}


class PhotoDomain(ImageDomain):
    """Square crops of scikit-learn's two sample photos (``china``, ``flower``; 427 x 640), resized to
    ``IMAGE_SIZE``, at an exposure that makes it clearly bright or clearly dark (half of each).

    Each photo is cut into a grid of ``PHOTO_BLOCK``-pixel blocks; a crop lies inside one block and the
    *block* decides the partition (each photo's exact share), so a test crop never overlaps a training crop.

    Labels: ``photo`` (``"china"`` / ``"flower"``), ``brightness`` (``"bright"`` / ``"dark"``: mean luma of
    the rendered crop against ``BRIGHTNESS_THRESHOLD``; no crop within ``BRIGHTNESS_MARGIN`` of it is drawn).
    """

    name = "photo"
    description = "a crop of one of two photographs (a temple in China, a flower)"

    def sample(self, rng: random.Random) -> ImageItem:
        while True:
            photo = rng.choice(PHOTO_NAMES)
            height, width = _photos()[photo].shape[:2]
            by, bx = rng.randrange(height // PHOTO_BLOCK), rng.randrange(width // PHOTO_BLOCK)
            size = rng.randint(*PHOTO_CROP_SIZES)
            y = by * PHOTO_BLOCK + rng.randint(0, PHOTO_BLOCK - size)
            x = bx * PHOTO_BLOCK + rng.randint(0, PHOTO_BLOCK - size)
            # The exposure aims the crop at a brightness class drawn first, so brightness is balanced and
            # says nothing about which photo the crop is from.
            brightness = rng.choice(sorted(BRIGHTNESS_TARGETS))
            raw = luminance(Image.fromarray(_photos()[photo][y : y + size, x : x + size]))
            exposure = round(rng.uniform(*BRIGHTNESS_TARGETS[brightness]) / max(raw, 1.0), 2)
            if not PHOTO_EXPOSURE[0] <= exposure <= PHOTO_EXPOSURE[1]:
                continue
            style = {"photo": photo, "block": [by, bx], "box": [x, y, size], "exposure": exposure}
            item = ImageItem(self.name, f"{photo}:{x},{y},{size}:{exposure}", {"photo": photo}, style)
            level = luminance(self.render(item))  # clipping at 255 can pull a bright crop back
            if abs(level - BRIGHTNESS_THRESHOLD) >= BRIGHTNESS_MARGIN:
                brightness = "bright" if level > BRIGHTNESS_THRESHOLD else "dark"
                return ImageItem(self.name, item.key, {"photo": photo, "brightness": brightness}, style)

    def render(self, item: ImageItem) -> Image.Image:
        x, y, size = item.style["box"]
        crop = _photos()[item.style["photo"]][y : y + size, x : x + size].astype(np.float64)
        pixels = np.clip(np.rint(crop * item.style["exposure"]), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)

    def partition(self, item: ImageItem) -> str:
        """The partition of the item's block: each photo's blocks, ordered by a hash, are cut by
        ``PARTITION_SHARES`` so both photos have their exact share of every partition."""
        by, bx = item.style["block"]
        return _photo_block_partitions()[item.style["photo"], by, bx]


@cache
def _photo_block_partitions() -> dict[tuple[str, int, int], str]:
    partitions = {}
    for photo, pixels in _photos().items():
        rows, cols = pixels.shape[0] // PHOTO_BLOCK, pixels.shape[1] // PHOTO_BLOCK
        blocks = sorted(
            ((by, bx) for by in range(rows) for bx in range(cols)),
            key=lambda b: unit_hash(f"photo:{photo}:{b}"),
        )
        for rank, (by, bx) in enumerate(blocks):
            partitions[photo, by, bx] = share_partition((rank + 0.5) / len(blocks))
    return partitions
