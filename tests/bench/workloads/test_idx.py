"""The IDX reader (MNIST / Fashion-MNIST files) on small files written here, byte by byte, from the format's
definition: magic 0x0000 + type code + rank, big-endian int32 dimensions, big-endian values."""

from __future__ import annotations

import gzip
import struct
import warnings

import pytest
import torch

from stochopt.bench.workloads import load_workload
from stochopt.data import mnist_idx, read_idx

CODES = {"B": 0x08, "b": 0x09, "h": 0x0B, "i": 0x0C, "f": 0x0D, "d": 0x0E}


def idx_bytes(values: list, shape: tuple[int, ...], fmt: str = "B") -> bytes:
    header = bytes([0, 0, CODES[fmt], len(shape)]) + struct.pack(f">{len(shape)}i", *shape)
    return header + struct.pack(f">{len(values)}{fmt}", *values)


def write(path, data: bytes, gz: bool) -> None:
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True], ids=["ubyte", "gz"])
def test_images_and_labels_round_trip(tmp_path, gz):
    images = [(7 * i) % 256 for i in range(3 * 4 * 5)]
    labels = [3, 0, 9]
    write(tmp_path / "images", idx_bytes(images, (3, 4, 5)), gz)
    write(tmp_path / "labels", idx_bytes(labels, (3,)), gz)
    x, y = read_idx(tmp_path / "images"), read_idx(tmp_path / "labels")
    assert x.dtype == torch.uint8 and x.shape == (3, 4, 5) and x.flatten().tolist() == images
    assert x[1, 2, 3] == images[1 * 20 + 2 * 5 + 3]  # C order: the last index runs fastest
    assert y.tolist() == labels


@pytest.mark.parametrize(
    "fmt, values, dtype",
    [("h", [-2, 300, 7, 1], torch.int16), ("i", [-70000, 1, 2**30, 5], torch.int32),
     ("f", [0.5, -1.25, 3.0, 8.0], torch.float32), ("d", [1e-300, -2.5, 0.1, 7.0], torch.float64),
     ("b", [-128, 127, 0, -1], torch.int8)],
)  # fmt: skip
def test_multibyte_types_are_read_big_endian(tmp_path, fmt, values, dtype):
    write(tmp_path / "a", idx_bytes(values, (2, 2), fmt), gz=False)
    got = read_idx(tmp_path / "a")
    assert got.dtype == dtype and got.shape == (2, 2) and got.flatten().tolist() == values


def test_bad_files_give_clear_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + struct.pack(">i", 1) + b"\x00")
    with pytest.raises(ValueError, match=r"'.*bad' is not an IDX file: bad magic number 12340801"):
        read_idx(tmp_path / "bad")
    (tmp_path / "code").write_bytes(bytes([0, 0, 0x42, 1]) + struct.pack(">i", 1) + b"\x00")
    with pytest.raises(ValueError, match=r"bad magic number 00004201"):
        read_idx(tmp_path / "code")
    write(tmp_path / "short.gz", idx_bytes([1, 2, 3, 4], (2, 2))[:-1], gz=True)
    with pytest.raises(ValueError, match=r"truncated or padded IDX file: header says shape \(2, 2\)"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match=r"bad magic number \(empty\)"):
        read_idx(tmp_path / "empty")


def make_mnist_dir(path, n_train=40, n_val=20, side=28, gz=True, sep="-"):
    gen = torch.Generator().manual_seed(0)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_val)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 256, (n, side, side), generator=gen)
        images[:, :4, :4] = (labels * 25).reshape(-1, 1, 1)  # a learnable cue: the label in one corner
        write(path / f"{split}-images{sep}idx3-ubyte{ext}", idx_bytes(images.flatten().tolist(), (n, side, side)), gz)
        write(path / f"{split}-labels{sep}idx1-ubyte{ext}", idx_bytes(labels.tolist(), (n,)), gz)
    return path


@pytest.mark.parametrize("gz, sep", [(True, "-"), (False, ".")])
def test_mnist_directory_loads_as_the_digits_do(tmp_path, gz, sep):
    train, val = mnist_idx(make_mnist_dir(tmp_path, gz=gz, sep=sep))
    x, y = train.tensors
    assert x.shape == (40, 784) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.long and y.tolist() == [i % 10 for i in range(40)]
    assert val.tensors[0].shape == (20, 784)


def test_missing_files_and_directories_are_named(tmp_path):
    with pytest.raises(ValueError, match="data_dir must be a directory"):
        mnist_idx(tmp_path / "nope")
    with pytest.raises(ValueError, match="data_dir must be a directory .*nope"):
        load_workload("digits_mlp", data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="target must be a finite number, got nan"):
        load_workload("digits_mlp", target=float("nan"))
    with pytest.raises(ValueError, match=r"has no train images file; expected one of \['train-images-idx3-ubyte'"):
        mnist_idx(tmp_path)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "autoencoder"])
def test_image_workloads_train_on_idx_files(tmp_path, name):
    data_dir = make_mnist_dir(tmp_path, n_train=64, n_val=16)
    with pytest.warns(UserWarning, match="set on the 8x8 digits"):
        load_workload(name, data_dir=data_dir)
    workload = load_workload(name, data_dir=str(data_dir), target=0.1)
    assert workload.target == 0.1
    workload.setup()
    model = workload.init_model(0)
    batch = next(workload.train_batches(16, 0))
    assert batch[0].shape == (16, 784)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = workload.loss(model, batch)
    first.backward()
    optimizer.step()
    with torch.no_grad():
        assert 0 <= workload.evaluate(model) < float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_workload(name)  # the digits: no warning
