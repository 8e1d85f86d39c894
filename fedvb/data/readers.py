"""Readers for the standard file formats of the datasets (no downloads)."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np

from fedvb.data.pickle_data import load_pickled_data

__all__ = ["read_cifar10_jpeg_tar", "read_cifar10_python", "read_idx", "read_idx_folder", "read_uci_table"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzip-compressed or not): ``uint8`` array of the shape in its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def idx_folder_has_files(folder: Path) -> bool:
    return all((folder / name).exists() or (folder / f"{name}.gz").exists() for name in IDX_FILES.values())


def read_idx_folder(folder: Path) -> dict[str, np.ndarray]:
    """The four standard IDX files of MNIST or Fashion-MNIST in ``folder``."""
    arrays = {}
    for key, name in IDX_FILES.items():
        path = folder / f"{name}.gz" if (folder / f"{name}.gz").exists() else folder / name
        arrays[key] = read_idx(path)
    return arrays


def read_cifar10_python(folder: Path) -> dict[str, np.ndarray]:
    """The original python batches (``data_batch_1..5``, ``test_batch``): images ``(N, 32, 32, 3)`` uint8.

    The batches are pickles; they are read as data (:func:`~fedvb.data.pickle_data.load_pickled_data`),
    so a crafted batch cannot run code."""

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / name, "rb") as handle:  # read as data, never unpickled (fedvb.data.pickle_data)
            raw = load_pickled_data(handle)
        raw = {k.encode() if isinstance(k, str) else k: v for k, v in raw.items()} if isinstance(raw, dict) else {}
        if not isinstance(raw.get(b"data"), np.ndarray) or not isinstance(raw.get(b"labels"), list):
            raise ValueError(f"{folder / name}: not a CIFAR-10 python batch (no data array and labels list)")
        images = np.asarray(raw[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return images, np.asarray(raw[b"labels"], dtype=np.uint8)

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = batch("test_batch")
    return {
        "x_train": np.concatenate([x for x, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "x_test": x_test,
        "y_test": y_test,
    }


def read_cifar10_jpeg_tar(path: Path) -> dict[str, np.ndarray]:
    """A tar of ``train/<class>/NNNN.jpg`` and ``test/<class>/NNNN.jpg``, decoded with Pillow.

    Files are taken in sorted member-name order within each split.
    """
    from PIL import Image

    index = {name: i for i, name in enumerate(CIFAR10_CLASSES)}
    found: dict[str, list[tuple[str, np.ndarray, int]]] = {"train": [], "test": []}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in found or not parts[-1].endswith(".jpg"):
                continue
            label = index[parts[-2]]
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                found[parts[-3]].append((member.name, np.asarray(image.convert("RGB"), dtype=np.uint8), label))
    arrays = {}
    for split in ("train", "test"):
        items = sorted(found[split], key=lambda item: item[0])
        arrays[f"x_{split}"] = np.stack([image for _, image, _ in items])
        arrays[f"y_{split}"] = np.asarray([label for _, _, label in items], dtype=np.uint8)
    return arrays


def read_uci_table(path: Path) -> list[list[str]]:
    """A UCI comma-separated text file as rows of strings (``?`` kept as is)."""
    with open(path) as handle:
        return [line.strip().split(",") for line in handle if line.strip()]
