"""Small datasets that ship with installed packages (no download), and a reader for MNIST-style IDX files the user
already has: shared by the examples, the distributed trainer and the benchmark's workloads."""

from __future__ import annotations

import array
import gzip
import math
import os
import struct
import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from stochopt.extras import require


def digits(seed: int = 0, val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1797 8x8 digits (bundled with scikit-learn), pixels scaled to [0, 1] as 64 features,
    split train/validation by a seeded permutation (80/20 by default)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    require("sklearn", feature="the digits dataset")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = round((1.0 - val_fraction) * len(x))
    train, val = order[:cut], order[cut:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


# IDX, the format of the MNIST and Fashion-MNIST files (LeCun et al.): two zero bytes, a type code, the number of
# dimensions, the dimensions as big-endian int32, then the values big-endian in C order.
IDX_TYPES = {0x08: (torch.uint8, "B"), 0x09: (torch.int8, "b"), 0x0B: (torch.int16, "h"),
             0x0C: (torch.int32, "i"), 0x0D: (torch.float32, "f"), 0x0E: (torch.float64, "d")}  # fmt: skip
IDX_SPLITS = {"train": "train", "val": "t10k"}


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """The array stored in an IDX file (``.gz`` compressed or not, recognized by content), as a tensor of its type."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}")
    dtype, code = IDX_TYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}i", raw[4:header]) if len(raw) >= header else None
    itemsize = torch.empty((), dtype=dtype).element_size()
    if shape is None or len(raw) != header + itemsize * math.prod(shape):
        raise ValueError(f"{str(path)!r} is a truncated or padded IDX file: header says shape {shape}")
    if dtype == torch.uint8:
        return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)
    values = array.array(code, raw[header:])
    if sys.byteorder == "little":
        values.byteswap()
    return torch.tensor(values, dtype=dtype).reshape(shape)


def idx_file(data_dir: str | os.PathLike, split: str, kind: str) -> Path:
    """The MNIST-named file of a split (``train``/``t10k``) and kind (``images``/``labels``), plain or gzipped,
    with a dash or a dot before ``idx`` (both namings are in circulation)."""
    rank = 3 if kind == "images" else 1
    names = [f"{split}-{kind}{sep}idx{rank}-ubyte{ext}" for sep in ("-", ".") for ext in ("", ".gz")]
    for name in names:
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    raise ValueError(f"data_dir {str(data_dir)!r} has no {split} {kind} file; expected one of {names}")


def mnist_idx(data_dir: str | os.PathLike) -> tuple[TensorDataset, TensorDataset]:
    """MNIST or Fashion-MNIST from the IDX files in ``data_dir`` (as distributed: ``train-*`` and ``t10k-*``, plain
    or ``.gz``), in the form of :func:`digits`: pixels scaled to [0, 1] and flattened, integer labels; the
    ``t10k`` files are the validation split. Nothing is downloaded."""
    if not Path(data_dir).is_dir():
        raise ValueError(f"data_dir must be a directory holding the MNIST IDX files, got {str(data_dir)!r}")
    out = []
    for split in IDX_SPLITS.values():
        images = read_idx(idx_file(data_dir, split, "images"))
        labels = read_idx(idx_file(data_dir, split, "labels"))
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise ValueError(
                f"{split} files in {str(data_dir)!r} do not pair: images {tuple(images.shape)}, labels "
                f"{tuple(labels.shape)} (expected N x H x W and N)"
            )
        out.append(TensorDataset(images.reshape(len(images), -1).float() / 255.0, labels.long()))
    return out[0], out[1]
