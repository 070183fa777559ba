"""Labeled images that install offline: Fashion-MNIST from the Debian package
`dataset-fashion-mnist` (MIT), sampled reproducibly and encoded as PNG files.
"""

import gzip
import io
import os
import pathlib

import numpy as np
from PIL import Image

# Where the Debian package puts the IDX files; CONVSEARCH_FASHION_MNIST_DIR points elsewhere.
FASHION_MNIST_DIR = pathlib.Path(
    os.environ.get("CONVSEARCH_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def _read_idx(path: pathlib.Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist_sample(per_class: int, split: str = "t10k", root: pathlib.Path = FASHION_MNIST_DIR
                         ) -> list[tuple[str, str, np.ndarray]]:
    """The first `per_class` images of each class in file order: (id, class name, 28x28 uint8).

    Raises FileNotFoundError naming the Debian package when the files are missing.
    """
    images_path = root / f"{split}-images-idx3-ubyte.gz"
    if not images_path.is_file():
        raise FileNotFoundError(f"{images_path} not found; install it with "
                                "`apt-get install dataset-fashion-mnist`")
    images = _read_idx(images_path)
    labels = _read_idx(root / f"{split}-labels-idx1-ubyte.gz")
    sample = []
    for label, name in enumerate(FASHION_CLASSES):
        for index in np.flatnonzero(labels == label)[:per_class]:
            sample.append((f"{split}-{index:05d}", name, images[index]))
    return sample


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array (grayscale or RGB)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
