"""Builds the demo dataset fashion200: the first 20 images of each of Fashion-MNIST's 10
classes in its test set (MIT licence), as PNG files in datasets/fashion200/<class>/<id>.png,
from the Debian package dataset-fashion-mnist. Reproducible: the same files every time."""

import pathlib
import shutil

from convsearch.datasets import encode_png, fashion_mnist_sample

TARGET = pathlib.Path(__file__).resolve().parent.parent / "datasets" / "fashion200"


def build() -> None:
    shutil.rmtree(TARGET, ignore_errors=True)
    for item_id, label, pixels in fashion_mnist_sample(per_class=20):
        folder = TARGET / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{item_id}.png").write_bytes(encode_png(pixels))
    print(f"wrote {sum(1 for _ in TARGET.rglob('*.png'))} images to {TARGET}")


if __name__ == "__main__":
    build()
