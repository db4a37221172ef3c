"""Tests of granet.data: the registry, splits, transforms, file formats and checksum-verified downloads.

No test touches the internet: tiny MNIST IDX files, CIFAR pickle batches (including one written
byte-for-byte in the Python 2 format of the official files), ImageNet-style folders and the official
archives are generated in ``tmp_path``, and downloads are served by a local ``http.server``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

from granet.data import (
    CHECKSUMS,
    MIRROR_ENV_VAR,
    DatasetError,
    DatasetInfo,
    DatasetSplits,
    build_datasets,
    check_integrity,
    list_datasets,
    md5sum,
    stratified_split,
)
from granet.data.cifar import load_cifar_batch
from granet.data.download import resolve_mirrors
from granet.data.mnist import read_idx
from granet.data.transforms import (
    CenterCrop,
    Normalize,
    PILToTensor,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
)

Image = pytest.importorskip("PIL.Image")

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------------------------------
# Fixtures and generators of the real file formats
# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the user's mirror / data-dir settings and any HTTP proxy out of the tests."""
    monkeypatch.delenv(MIRROR_ENV_VAR, raising=False)
    monkeypatch.delenv("GRANET_DATA_DIR", raising=False)
    # urllib would send requests for 127.0.0.1 to a configured proxy unless it is bypassed.
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """Write ``array`` (uint8) as an IDX file; gzip-compressed when ``path`` ends in ``.gz``."""
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def make_mnist_arrays(n_train: int = 40, n_test: int = 20) -> Dict[str, np.ndarray]:
    """Random 28x28 images and balanced labels; pixel (0, 5, 7) of train image 0 is 200."""
    rng = np.random.default_rng(1)
    arrays = {
        MNIST_FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        MNIST_FILES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        MNIST_FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        MNIST_FILES[3]: (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    arrays[MNIST_FILES[0]][0, 5, 7] = 200
    return arrays


def write_mnist(
    directory: Path, arrays: Dict[str, np.ndarray], gz: Sequence[bool] = (True, True, False, False)
) -> None:
    """Write the four MNIST files, compressing those flagged in ``gz``."""
    directory.mkdir(parents=True, exist_ok=True)
    for (stem, array), compress in zip(arrays.items(), gz):
        write_idx(directory / (stem + (".gz" if compress else "")), array, 2051 if array.ndim == 3 else 2049)


def py2_cifar_pickle(data: np.ndarray, labels: Sequence[int], label_key: str) -> bytes:
    """Serialise a batch exactly like Python 2's cPickle (protocol 2) did for the official CIFAR files.

    Python 3 cannot produce this (py2 ``str`` -> ``SHORT_BINSTRING``/``BINSTRING`` opcodes and the
    ``numpy.core.multiarray`` path), so the opcodes are written by hand.
    """

    def short(s: bytes) -> bytes:
        """SHORT_BINSTRING opcode (a Python 2 ``str`` of < 256 bytes)."""
        return b"U" + bytes([len(s)]) + s

    raw = data.tobytes()
    out = bytearray(b"\x80\x02}q\x00(")
    out += short(b"batch_label") + short(b"testing batch 1 of 1")
    out += short(b"data") + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b") + b"\x87R"
    out += b"(K\x01J" + struct.pack("<i", data.shape[0]) + b"M" + struct.pack("<H", data.shape[1]) + b"\x86"
    out += b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R(K\x03" + short(b"|")
    out += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"
    out += short(label_key.encode()) + b"](" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e"
    out += b"u."
    return bytes(out)


def py3_cifar_pickle(
    data: np.ndarray, labels: Sequence[int], label_key: str, extra: Optional[Dict[bytes, object]] = None
) -> bytes:
    """Pickle a batch with ``bytes`` keys, as ``pickle.load(f, encoding="bytes")`` returns them."""
    batch = {b"batch_label": b"training batch", b"data": data, label_key.encode(): list(map(int, labels))}
    batch.update(extra or {})
    return pickle.dumps(batch, protocol=2)


def make_cifar10(
    root: Path, per_batch: int = 6, n_test: int = 10
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write ``cifar-10-batches-py`` with 5 training batches and a test batch; returns the raw arrays.

    ``test_batch`` uses the Python 2 byte format of the official files, the others Python 3 pickles.
    Labels cycle through 0..9 so every class has 3 training images.
    """
    rng = np.random.default_rng(2)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_data, train_labels = [], []
    for b in range(5):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = (np.arange(per_batch) + b * per_batch) % 10
        (folder / f"data_batch_{b + 1}").write_bytes(py3_cifar_pickle(data, labels, "labels"))
        train_data.append(data)
        train_labels.append(labels)
    test_data = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = np.arange(n_test)[::-1] % 10
    (folder / "test_batch").write_bytes(py2_cifar_pickle(test_data, test_labels, "labels"))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2))
    return np.concatenate(train_data), np.concatenate(train_labels), test_data, test_labels


def make_cifar10_archive(directory: Path) -> Tuple[Path, np.ndarray]:
    """Build a ``cifar-10-python.tar.gz`` with the official member names; returns it and the train data."""
    staging = directory / "staging"
    train_data, _, _, _ = make_cifar10(staging)
    archive = directory / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, train_data


def tensor_image(flat: np.ndarray) -> torch.Tensor:
    """CIFAR row (3072 bytes) -> uint8 (3, 32, 32) tensor."""
    return torch.from_numpy(flat.reshape(3, 32, 32).copy())


def normalise(
    image: torch.Tensor, mean: Sequence[float], std: Sequence[float], max_value: float = 255.0
) -> torch.Tensor:
    """Reference normalisation in float64, returned as float32."""
    m = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    return ((image.to(torch.float64) / max_value - m) / s).to(torch.float32)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static file handler that does not write request logs to stderr."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        """Drop the request log line."""


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[Tuple[Path, str]]:
    """Serve ``tmp_path/www`` on 127.0.0.1 (free port) from a background thread; yields (root, url)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    # A short poll interval keeps shutdown() (which waits for the next poll) fast.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def leftovers(directory: Path) -> List[str]:
    """Temporary download / extraction files left in ``directory`` (must always be none)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".part"))


def split_indices(splits: DatasetSplits) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (into the official training split) of the train and val views."""
    return splits.train.indices, splits.val.indices


# --------------------------------------------------------------------------------------------------
# Registry and splitting
# --------------------------------------------------------------------------------------------------


def test_list_datasets() -> None:
    """All built-in datasets are registered."""
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion_mnist", "imagenet", "mnist", "mnist1d", "synthetic"]


def test_unknown_dataset_lists_valid_names() -> None:
    """An unknown name raises ValueError listing the valid names."""
    names = "cifar10, cifar100, digits, fashion_mnist, imagenet, mnist, mnist1d, synthetic"
    with pytest.raises(ValueError, match=f"unknown dataset 'svhn'; valid: {names}"):
        build_datasets("svhn")


def test_unknown_option_and_bad_fraction() -> None:
    """Unknown options raise TypeError; val_fraction outside [0, 1) raises ValueError."""
    with pytest.raises(TypeError, match="does not accept option.*colour.*valid options: num_classes"):
        build_datasets("synthetic", colour=True)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            build_datasets("synthetic", val_fraction=bad)


def test_stratified_split_is_exact_disjoint_and_seeded() -> None:
    """The split partitions the indices, keeps class proportions and depends only on the seed."""
    targets = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    kept, held = stratified_split(targets, 0.1, seed=3)
    assert held.numel() == 10 and kept.numel() == 90
    assert torch.equal(torch.sort(torch.cat([kept, held])).values, torch.arange(100))
    assert torch.bincount(targets[held], minlength=3).tolist() == [5, 3, 2]
    again_kept, again_held = stratified_split(targets, 0.1, seed=3)
    assert torch.equal(kept, again_kept) and torch.equal(held, again_held)
    assert not torch.equal(held, stratified_split(targets, 0.1, seed=4)[1])
    # Largest remainder keeps the total exact: 0.15 * 100 = 15 = 7.5 + 4.5 + 3 -> 8 + 4 + 3.
    assert torch.bincount(targets[stratified_split(targets, 0.15, 0)[1]], minlength=3).tolist() == [8, 4, 3]
    kept0, held0 = stratified_split(targets, 0.0, 0)
    assert torch.equal(kept0, torch.arange(100)) and held0.numel() == 0
    # A positive fraction always holds out at least one sample.
    assert stratified_split(torch.tensor([0, 1, 0]), 0.01, 0)[1].numel() == 1


# --------------------------------------------------------------------------------------------------
# digits and synthetic
# --------------------------------------------------------------------------------------------------


def test_digits_splits() -> None:
    """digits: 1797 images over the splits, 1x8x8, 10 classes, a test split fixed across seeds."""
    splits = build_datasets("digits", val_fraction=0.1, seed=0)
    info = splits.info
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == ("digits", 10, 1, 8)
    assert info.num_train + info.num_val + info.num_test == 1797
    assert (info.num_test, info.num_val, info.num_train) == (359, 144, 1294)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1294, 144, 359)
    image, label = splits.test[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and isinstance(label, int)
    assert set(splits.test.targets.tolist()) == set(range(10))
    train_idx, val_idx = split_indices(splits)
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values, torch.arange(1438))

    other = build_datasets("digits", val_fraction=0.1, seed=1)
    test_a = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    test_b = torch.stack([other.test[i][0] for i in range(len(other.test))])
    assert torch.equal(test_a, test_b) and torch.equal(splits.test.targets, other.test.targets)
    assert not torch.equal(val_idx, other.val.indices)
    assert torch.equal(val_idx, build_datasets("digits", val_fraction=0.1, seed=0).val.indices)

    # All 1797 scikit-learn images are used exactly once (same pixel total and class counts).
    from sklearn.datasets import load_digits

    bunch = load_digits()
    assert int(splits.train.images.sum()) + int(splits.test.images.sum()) == int(bunch.images.sum())
    all_labels = torch.cat([splits.train.targets, splits.val.targets, splits.test.targets])
    assert torch.bincount(all_labels).tolist() == np.bincount(bunch.target).tolist()

    # Normalisation of a known pixel: pixels 0..16 are scaled by 1/16.
    value = int(splits.test.images[0, 0, 3, 4])
    expected = (value / 16 - info.mean[0]) / info.std[0]
    assert splits.test[0][0][0, 3, 4].item() == pytest.approx(expected, abs=1e-6)
    scaled = splits.train.images.double() / 16  # statistics come from the non-test images only
    assert info.mean[0] == pytest.approx(scaled.mean().item()) and info.std[0] == pytest.approx(scaled.std().item())

    no_val = build_datasets("digits", val_fraction=0.0)
    assert no_val.val is None and no_val.info.num_val == 0 and no_val.info.num_train == 1438


def test_synthetic_shapes_options_and_learnability() -> None:
    """synthetic: options set the shapes and the labels can be learned."""
    splits = build_datasets(
        "synthetic", val_fraction=0.25, seed=0, num_classes=4, image_size=8, in_channels=2, num_train=64, num_test=16
    )
    info = splits.info
    assert isinstance(info, DatasetInfo)
    assert (info.num_classes, info.in_channels, info.image_size, info.input_shape) == (4, 2, 8, (2, 8, 8))
    assert (info.num_train, info.num_val, info.num_test) == (48, 16, 16)
    assert splits.train[0][0].shape == (2, 8, 8)
    assert torch.bincount(splits.test.targets, minlength=4).tolist() == [4, 4, 4, 4]

    default = build_datasets("synthetic")
    assert (default.info.num_classes, default.info.input_shape) == (10, (3, 32, 32))
    assert (default.info.num_train + default.info.num_val, default.info.num_test) == (512, 128)
    # The data depends on data_seed only, not on the split seed.
    assert torch.equal(default.test.images, build_datasets("synthetic", seed=7).test.images)
    assert not torch.equal(default.test.images, build_datasets("synthetic", data_seed=1).test.images)

    # Learnable: a nearest-class-mean classifier fit on train classifies the test split perfectly.
    xs = torch.stack([default.train[i][0] for i in range(len(default.train))]).flatten(1)
    means = torch.stack([xs[default.train.targets == c].mean(0) for c in range(10)])
    test_x = torch.stack([default.test[i][0] for i in range(len(default.test))]).flatten(1)
    assert torch.equal(torch.cdist(test_x, means).argmin(1), default.test.targets)

    # ...and a few SGD steps of a linear model reduce the loss.
    torch.manual_seed(0)
    model = torch.nn.Linear(3072, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(default.train, batch_size=64, shuffle=True)
    losses = []
    for _ in range(2):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x.flatten(1)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------------


def test_mnist_idx_gz_and_raw(tmp_path: Path) -> None:
    """MNIST IDX files load from .gz and raw files in both layouts, with exact values."""
    arrays = make_mnist_arrays()
    write_mnist(tmp_path / "mnist", arrays, gz=(True, True, False, False))
    splits = build_datasets("mnist", tmp_path, val_fraction=0.25, seed=0)
    info = splits.info
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)
    assert (info.mean, info.std) == ((0.1307,), (0.3081,))
    assert (info.num_train, info.num_val, info.num_test) == (30, 10, 20)
    assert torch.bincount(splits.val.targets, minlength=10).tolist() == [1] * 10
    train_idx, val_idx = split_indices(splits)
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values, torch.arange(40))
    assert splits.test.targets.tolist() == arrays[MNIST_FILES[3]].tolist()
    assert torch.equal(splits.train.images.squeeze(1), torch.from_numpy(arrays[MNIST_FILES[0]]))

    image, label = splits.test[3]
    assert image.shape == (1, 28, 28) and label == int(arrays[MNIST_FILES[3]][3])
    source = torch.from_numpy(arrays[MNIST_FILES[2]][3]).unsqueeze(0)
    assert torch.allclose(image, normalise(source, (0.1307,), (0.3081,)), atol=1e-6)
    # Known pixel of official training image 0 (in train or val depending on the split).
    view, where = (splits.train, int((train_idx == 0).nonzero()[0])) if (train_idx == 0).any() else (splits.val, 0)
    assert view[where][0][0, 5, 7].item() == pytest.approx((200 / 255 - 0.1307) / 0.3081, abs=1e-6)
    # No augmentation for MNIST: under any RNG state a training or validation sample is exactly its
    # normalised source image.
    for view in (splits.train, splits.val):
        source = torch.from_numpy(arrays[MNIST_FILES[0]][int(view.indices[0])]).unsqueeze(0)
        samples = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            samples.append(view[0][0])
        assert torch.equal(samples[0], samples[1])
        assert torch.allclose(samples[0], normalise(source, (0.1307,), (0.3081,)), atol=1e-6)

    # The other compression mix and torchvision's MNIST/raw layout give identical data.
    write_mnist(tmp_path / "tv" / "MNIST" / "raw", arrays, gz=(False, False, True, True))
    same = build_datasets("mnist", tmp_path / "tv", val_fraction=0.25, seed=0)
    assert torch.equal(same.train.images, splits.train.images) and torch.equal(same.val.indices, val_idx)
    assert torch.equal(same.test.images, splits.test.images)


def test_fashion_mnist_layout(tmp_path: Path) -> None:
    """Fashion-MNIST uses its own folder and statistics."""
    arrays = make_mnist_arrays(20, 10)
    write_mnist(tmp_path / "fashion_mnist", arrays, gz=(True, True, True, True))
    splits = build_datasets("Fashion-MNIST", tmp_path, val_fraction=0.0)
    assert splits.val is None
    assert (splits.info.name, splits.info.num_train, splits.info.num_test) == ("fashion_mnist", 20, 10)
    assert (splits.info.mean, splits.info.std) == ((0.2860,), (0.3530,))
    with pytest.raises(DatasetError, match="Fashion-MNIST not found"):
        build_datasets("fashion_mnist", tmp_path / "empty")


def test_mnist_missing_and_corrupt_files(tmp_path: Path) -> None:
    """Missing, truncated, mislabelled and undecodable IDX files raise DatasetError."""
    with pytest.raises(DatasetError) as missing:
        build_datasets("mnist", tmp_path)
    message = str(missing.value)
    assert "\n" not in message and str(tmp_path / "mnist") in message
    assert "train-images-idx3-ubyte[.gz]" in message and "download=True" in message and "--download" in message

    arrays = make_mnist_arrays()
    write_mnist(tmp_path / "mnist", arrays, gz=(False, False, False, False))
    images = tmp_path / "mnist" / MNIST_FILES[0]
    images.write_bytes(images.read_bytes()[:-5])  # truncated
    with pytest.raises(DatasetError, match="truncated or corrupt file; delete the MNIST files in .*download") as bad:
        build_datasets("mnist", tmp_path)
    assert str(tmp_path / "mnist") in str(bad.value) and "\n" not in str(bad.value)
    write_idx(images, arrays[MNIST_FILES[0]], magic=2049)  # labels magic on an images file
    with pytest.raises(DatasetError, match="magic number 2049, expected 2051"):
        build_datasets("mnist", tmp_path)
    write_idx(images, arrays[MNIST_FILES[0]][:-1], magic=2051)  # one image fewer than labels
    with pytest.raises(DatasetError, match="39 images but .* 40 labels"):
        build_datasets("mnist", tmp_path)
    (tmp_path / "mnist" / MNIST_FILES[2]).unlink()
    (tmp_path / "mnist" / (MNIST_FILES[2] + ".gz")).write_bytes(b"not gzip at all")
    write_idx(images, arrays[MNIST_FILES[0]], magic=2051)
    with pytest.raises(DatasetError, match="cannot read"):
        build_datasets("mnist", tmp_path)


def test_read_idx_parses_big_endian_header(tmp_path: Path) -> None:
    """read_idx honours the big-endian header and rejects short files."""
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(struct.pack(">IIII", 2051, 2, 3, 4) + bytes(range(24)))
    array = read_idx(path, 2051)
    assert array.shape == (2, 3, 4) and array.dtype == np.uint8 and array[1, 2, 3] == 23
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetError, match="too short"):
        read_idx(path, 2051)
    path.write_bytes(struct.pack(">II", 2051, 2))
    with pytest.raises(DatasetError, match="truncated inside its IDX header"):
        read_idx(path, 2051)


# --------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------


def test_cifar10_batches_splits_and_normalisation(tmp_path: Path) -> None:
    """CIFAR-10 batches: counts, honest split, channel layout and normalisation."""
    train_data, train_labels, test_data, test_labels = make_cifar10(tmp_path)
    splits = build_datasets("cifar10", tmp_path, val_fraction=1 / 3, seed=5, augment=False)
    info = splits.info
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == ("cifar10", 10, 3, 32)
    assert (info.mean, info.std) == (CIFAR10_MEAN, CIFAR10_STD)
    assert (info.num_train, info.num_val, info.num_test) == (20, 10, 10)
    train_idx, val_idx = split_indices(splits)
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values, torch.arange(30))
    assert torch.bincount(splits.val.targets, minlength=10).tolist() == [1] * 10
    assert torch.equal(splits.train.targets, torch.from_numpy(train_labels)[train_idx])
    assert splits.test.targets.tolist() == test_labels.tolist()

    # Row layout: the first 1024 bytes are the red plane, row-major.
    image, label = splits.val[2]
    source = int(val_idx[2])
    assert label == int(train_labels[source])
    assert torch.allclose(image, normalise(tensor_image(train_data[source]), CIFAR10_MEAN, CIFAR10_STD), atol=1e-6)
    c, y, x = 1, 5, 7
    value = int(train_data[source][c * 1024 + y * 32 + x])
    assert image[c, y, x].item() == pytest.approx((value / 255 - CIFAR10_MEAN[c]) / CIFAR10_STD[c], abs=1e-6)
    test_image, _ = splits.test[9]
    assert torch.allclose(test_image, normalise(tensor_image(test_data[9]), CIFAR10_MEAN, CIFAR10_STD), atol=1e-6)

    again = build_datasets("cifar10", tmp_path, val_fraction=1 / 3, seed=5)
    assert torch.equal(again.val.indices, val_idx)
    assert not torch.equal(build_datasets("cifar10", tmp_path, val_fraction=1 / 3, seed=6).val.indices, val_idx)


def test_cifar10_augmentation_only_on_train(tmp_path: Path) -> None:
    """Only training samples are augmented, reproducibly, with padded crops and flips."""
    train_data, _, test_data, _ = make_cifar10(tmp_path)
    splits = build_datasets("cifar10", tmp_path, val_fraction=0.2, seed=0, augment=True)
    # Validation and test samples are exactly their normalised source images, whatever the RNG state.
    val_source = tensor_image(train_data[int(splits.val.indices[1])])
    for view, source in ((splits.val, val_source), (splits.test, tensor_image(test_data[1]))):
        samples = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            samples.append(view[1][0])
        assert torch.equal(samples[0], samples[1])
        assert torch.allclose(samples[0], normalise(source, CIFAR10_MEAN, CIFAR10_STD), atol=1e-6)

    # Reproducible from torch's global RNG.
    torch.manual_seed(123)
    first = splits.train[3][0]
    torch.manual_seed(123)
    assert torch.equal(first, splits.train[3][0])

    # Every augmented sample is one of the 9x9 windows of the zero-padded image, possibly mirrored.
    source = tensor_image(train_data[int(splits.train.indices[3])])
    padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
    padded[:, 4:36, 4:36] = source
    candidates = []
    for top in range(9):
        for left in range(9):
            window = normalise(padded[:, top : top + 32, left : left + 32], CIFAR10_MEAN, CIFAR10_STD)
            candidates += [window, window.flip(-1)]
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        sample = splits.train[3][0]
        matches = [k for k, cand in enumerate(candidates) if torch.allclose(sample, cand, atol=1e-5)]
        assert matches, "augmented sample is not a padded crop / flip of the source image"
        seen.add(matches[0])
    assert len(seen) > 1


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    """CIFAR-100 uses the fine labels (100 classes) and its own statistics."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = rng.integers(0, 256, (200, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, (100, 3072), dtype=np.uint8)
    fine_train, fine_test = np.arange(200) % 100, np.arange(100)[::-1]
    coarse = {b"coarse_labels": [0] * 200}
    (folder / "train").write_bytes(py3_cifar_pickle(train, fine_train, "fine_labels", coarse))
    (folder / "test").write_bytes(py2_cifar_pickle(test, fine_test, "fine_labels"))
    splits = build_datasets("cifar100", tmp_path, val_fraction=0.5, seed=0)
    info = splits.info
    assert (info.num_classes, info.num_train, info.num_val, info.num_test) == (100, 100, 100, 100)
    assert (info.mean, info.std) == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    assert torch.bincount(splits.val.targets, minlength=100).tolist() == [1] * 100
    assert splits.test.targets.tolist() == fine_test.tolist()
    assert splits.test[0][0].shape == (3, 32, 32)
    assert torch.allclose(splits.test[4][0], normalise(tensor_image(test[4]), info.mean, info.std), atol=1e-6)


def test_cifar_batch_validation(tmp_path: Path) -> None:
    """Malformed CIFAR batches raise DatasetError naming the problem."""
    good = np.zeros((2, 3072), dtype=np.uint8)
    path = tmp_path / "batch"
    path.write_bytes(py2_cifar_pickle(good, [1, 2], "labels"))
    images, labels = load_cifar_batch(path, "labels")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [1, 2]

    path.write_bytes(py3_cifar_pickle(np.zeros((2, 3000), dtype=np.uint8), [1, 2], "labels"))
    with pytest.raises(DatasetError, match=r"expected uint8 \(N, 3072\)"):
        load_cifar_batch(path, "labels")
    path.write_bytes(py3_cifar_pickle(good, [1], "labels"))
    with pytest.raises(DatasetError, match="2 images but labels"):
        load_cifar_batch(path, "labels")
    path.write_bytes(py3_cifar_pickle(good, [1, 2], "labels"))
    with pytest.raises(DatasetError, match="lacks the keys"):
        load_cifar_batch(path, "fine_labels")
    path.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a valid CIFAR batch"):
        load_cifar_batch(path, "labels")


class _Exploit:
    """Pickles to a call of os.system: must never run when a batch is loaded."""

    def __reduce__(self) -> Tuple[object, Tuple[str]]:
        """Reduce to ``os.system("touch exploited")``."""
        return (os.system, ("touch exploited",))


def test_cifar_refuses_arbitrary_pickle_globals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickle that would run code is refused without running it."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}))
    with pytest.raises(DatasetError, match="not allowed"):
        load_cifar_batch(path, "labels")
    assert not (tmp_path / "exploited").exists()


def test_cifar_missing_files_and_present_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing files are reported; a placed archive is MD5-checked and extracted."""
    with pytest.raises(DatasetError) as missing:
        build_datasets("cifar10", tmp_path / "nowhere")
    message = str(missing.value)
    assert "\n" not in message and str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message and "download=True" in message

    # An incomplete folder is reported too.
    make_cifar10(tmp_path / "partial")
    (tmp_path / "partial" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_1, data_batch_2, data_batch_3"):
        build_datasets("cifar10", tmp_path / "partial")

    # A manually placed official archive is verified against its MD5, then extracted.
    www = tmp_path / "archives"
    www.mkdir()
    archive, train_data = make_cifar10_archive(www)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / archive.name).write_bytes(archive.read_bytes())
    (tmp_path / "partial" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="data_batch_3 is not a valid CIFAR batch.*delete .*download=True"):
        build_datasets("cifar10", tmp_path / "partial")
    with pytest.raises(DatasetError, match="fails its MD5 check.*download=True"):
        build_datasets("cifar10", data_dir)  # official checksum != generated archive
    assert not (data_dir / "cifar-10-batches-py").exists()
    monkeypatch.setitem(CHECKSUMS["cifar10"], archive.name, md5sum(archive))
    splits = build_datasets("cifar10", data_dir, val_fraction=0.0, augment=False)
    assert splits.info.num_train == 30 and leftovers(data_dir) == []
    assert torch.equal(splits.train.images[7], tensor_image(train_data[7]))


# --------------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------------


def test_cifar10_download_from_local_mirror(
    tmp_path: Path, http_server: Tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """download=True fetches, verifies and extracts the archive from a mirror."""
    www, url = http_server
    archive, train_data = make_cifar10_archive(www)
    digest = md5sum(archive)
    monkeypatch.setitem(CHECKSUMS["cifar10"], archive.name, digest)

    data_dir = tmp_path / "data"
    splits = build_datasets("cifar10", data_dir, download=True, mirror=url, val_fraction=0.1)
    assert (splits.info.num_train, splits.info.num_val, splits.info.num_test) == (27, 3, 10)
    assert check_integrity(data_dir / archive.name, digest)
    assert (data_dir / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert leftovers(data_dir) == []

    # A corrupt archive already present is detected by its checksum and replaced.
    other = tmp_path / "other"
    other.mkdir()
    (other / archive.name).write_bytes(b"corrupt")
    build_datasets("cifar10", other, download=True, mirror=url)
    assert md5sum(other / archive.name) == digest


def test_download_checksum_mismatch_leaves_no_file(
    tmp_path: Path, http_server: Tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checksum mismatch raises DatasetError and leaves nothing behind."""
    www, url = http_server
    archive, _ = make_cifar10_archive(www)
    monkeypatch.setitem(CHECKSUMS["cifar10"], archive.name, "0" * 32)
    data_dir = tmp_path / "data"
    with pytest.raises(DatasetError) as excinfo:
        build_datasets("cifar10", data_dir, download=True, mirror=url)
    message = str(excinfo.value)
    assert "checksum mismatch" in message and archive.name in message and "0" * 32 in message and "\n" not in message
    assert list(data_dir.iterdir()) == []  # neither the archive nor a partial file


def test_download_http_error_is_dataset_error(tmp_path: Path, http_server: Tuple[Path, str]) -> None:
    """An HTTP error becomes a DatasetError naming the URL and the status."""
    _, url = http_server
    with pytest.raises(DatasetError, match=r"could not download cifar-100-python.tar.gz .*404"):
        build_datasets("cifar100", tmp_path / "data", download=True, mirror=url)
    assert list((tmp_path / "data").iterdir()) == []


def test_mnist_download_via_environment_mirror(
    tmp_path: Path, http_server: Tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GRANET_DATA_MIRROR with a {name} placeholder serves the MNIST .gz files."""
    www, url = http_server
    arrays = make_mnist_arrays()
    write_mnist(www / "mnist", arrays, gz=(True, True, True, True))
    for stem in MNIST_FILES:
        monkeypatch.setitem(CHECKSUMS["mnist"], stem + ".gz", md5sum(www / "mnist" / (stem + ".gz")))
    # {name} lets one mirror host every dataset.
    monkeypatch.setenv(MIRROR_ENV_VAR, url + "/{name}")
    assert resolve_mirrors("mnist") == [url + "/mnist"]

    data_dir = tmp_path / "data"
    splits = build_datasets("mnist", data_dir, download=True, val_fraction=0.0)
    assert (splits.info.num_train, splits.info.num_test) == (40, 20)
    assert sorted(p.name for p in (data_dir / "mnist").iterdir()) == sorted(s + ".gz" for s in MNIST_FILES)
    assert torch.equal(splits.train.images.squeeze(1), torch.from_numpy(arrays[MNIST_FILES[0]]))


def test_resolve_mirrors_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """Explicit mirror > environment variable > official locations."""
    assert resolve_mirrors("cifar10") == ["https://www.cs.toronto.edu/~kriz/"]
    assert resolve_mirrors("mnist")[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    monkeypatch.setenv(MIRROR_ENV_VAR, "http://a/{name} http://b")
    assert resolve_mirrors("cifar10") == ["http://a/cifar10", "http://b"]
    assert resolve_mirrors("cifar10", mirror="http://c/") == ["http://c/"]
    assert resolve_mirrors("mnist", mirror=["file:///x/{name}"]) == ["file:///x/mnist"]


def test_official_checksums() -> None:
    """The published MD5 checksums of the official archives."""
    assert CHECKSUMS["cifar10"] == {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
    assert CHECKSUMS["cifar100"] == {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}
    assert CHECKSUMS["mnist"]["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert CHECKSUMS["fashion_mnist"]["t10k-labels-idx1-ubyte.gz"] == "bb300cfdad3c16e7a12a480ee83cd310"


def test_md5_and_integrity(tmp_path: Path) -> None:
    """md5sum and check_integrity agree with hashlib."""
    path = tmp_path / "file"
    path.write_bytes(b"granet" * 1000)
    digest = hashlib.md5(b"granet" * 1000).hexdigest()
    assert md5sum(path, chunk_size=7) == digest
    assert check_integrity(path, digest) and check_integrity(path, digest.upper()) and check_integrity(path, None)
    assert not check_integrity(path, "0" * 32) and not check_integrity(tmp_path / "absent", None)


# --------------------------------------------------------------------------------------------------
# ImageNet-style folders
# --------------------------------------------------------------------------------------------------

CLASS_COLOURS = {"cat": (200, 30, 40), "dog": (10, 220, 90), "eel": (60, 70, 250)}


def make_imagenet(root: Path, n_train: int = 4, n_val: int = 2) -> None:
    """Three classes; train mixes JPEG/PNG/grayscale and sizes, val holds solid-colour PNGs."""
    for label, (name, colour) in enumerate(sorted(CLASS_COLOURS.items())):
        train_dir = root / "train" / name
        (train_dir / "nested").mkdir(parents=True)
        (train_dir / "notes.txt").write_text("not an image")
        for i in range(n_train):
            size = (30 + 4 * i, 40 - 3 * i)
            target = train_dir / ("nested" if i == n_train - 1 else "") / f"{name}_{i}.{'JPEG' if i % 2 else 'png'}"
            image = Image.new("L" if i == 2 else "RGB", size, colour[0] if i == 2 else colour)
            image.save(target, format="JPEG" if i % 2 else "PNG")
        val_dir = root / "val" / name
        val_dir.mkdir(parents=True)
        for i in range(n_val):
            Image.new("RGB", (24, 20), colour).save(val_dir / f"val_{i}.png")


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_imagenet_folders(tmp_path: Path) -> None:
    """ImageFolder layout: classes, honest split, exact eval transform, sizes, pickling."""
    make_imagenet(tmp_path / "imagenet")
    splits = build_datasets("imagenet", tmp_path, val_fraction=0.25, seed=0, image_size=16, resize_size=20)
    info = splits.info
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == ("imagenet", 3, 3, 16)
    assert (info.mean, info.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (info.num_train, info.num_val, info.num_test) == (9, 3, 6)
    assert splits.train.classes == ["cat", "dog", "eel"]
    assert torch.bincount(splits.val.targets, minlength=3).tolist() == [1, 1, 1]
    assert splits.test.targets.tolist() == [0, 0, 1, 1, 2, 2]
    train_idx, val_idx = splits.train.indices, splits.val.indices
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values, torch.arange(12))
    assert all(splits.train.path(i).parts[-2] in ("cat", "dog", "eel", "nested") for i in range(len(splits.train)))
    assert all("val" == splits.test.path(i).parts[-3] for i in range(len(splits.test)))

    # Eval transform: resize short side to 20 (a no-op here) and center-crop 16: a solid colour stays exact.
    for i, (name, colour) in enumerate(sorted(CLASS_COLOURS.items())):
        image, label = splits.test[2 * i]
        assert image.shape == (3, 16, 16) and label == i
        solid = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16)
        expected = normalise(solid, IMAGENET_MEAN, IMAGENET_STD)
        assert torch.allclose(image, expected, atol=1e-6)
    # Eval transforms use no RNG: the same sample under two RNG states.
    for view, index in ((splits.val, 0), (splits.test, 1)):
        torch.manual_seed(0)
        first = view[index][0]
        torch.manual_seed(1)
        assert torch.equal(first, view[index][0])

    torch.manual_seed(0)
    sample = splits.train[0][0]
    torch.manual_seed(0)
    assert torch.equal(sample, splits.train[0][0]) and sample.shape == (3, 16, 16)

    # Default sizes: 224 crops after a 256 resize.
    default = build_datasets("imagenet", tmp_path / "imagenet", val_fraction=0.0)
    assert default.val is None and default.info.image_size == 224
    assert default.test[0][0].shape == (3, 224, 224) and default.train[5][0].shape == (3, 224, 224)

    # Datasets survive pickling (DataLoader workers started with spawn).
    clone = pickle.loads(pickle.dumps(splits.test))
    assert torch.equal(clone[3][0], splits.test[3][0])


def test_imagenet_errors(tmp_path: Path) -> None:
    """Missing, inconsistent, flat, empty and undecodable ImageNet folders raise DatasetError."""
    with pytest.raises(DatasetError) as missing:
        build_datasets("imagenet", tmp_path)
    message = str(missing.value)
    assert "\n" not in message and str(tmp_path / "imagenet") in message and "train/ and val/" in message
    assert "cannot be downloaded" in message

    make_imagenet(tmp_path / "imagenet")
    (tmp_path / "imagenet" / "val" / "eel").rename(tmp_path / "imagenet" / "val" / "fox")
    pattern = r"same class folders.*1 missing \(e.g. \['eel'\]\), 1 unexpected \(e.g. \['fox'\]\)"
    with pytest.raises(DatasetError, match=pattern):
        build_datasets("imagenet", tmp_path)

    flat = tmp_path / "flat"
    make_imagenet(flat)
    for class_dir in list((flat / "val").iterdir()):
        for image in class_dir.iterdir():
            image.rename(flat / "val" / f"{class_dir.name}_{image.name}")
        class_dir.rmdir()
    with pytest.raises(DatasetError, match="no class sub-folders.*valprep"):
        build_datasets("imagenet", flat)

    empty = tmp_path / "empty"
    make_imagenet(empty)
    for image in (empty / "train" / "dog").rglob("*.*"):
        image.unlink()
    with pytest.raises(DatasetError, match="holds no image files"):
        build_datasets("imagenet", empty)

    broken = tmp_path / "broken"
    make_imagenet(broken)
    (broken / "val" / "cat" / "val_0.png").write_bytes(b"not a png")
    splits = build_datasets("imagenet", broken, image_size=16)
    with pytest.raises(DatasetError, match="cannot decode image .*val_0.png"):
        splits.test[0]


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def test_tensor_transforms() -> None:
    """RandomCrop, RandomHorizontalFlip and Normalize on tensors."""
    image = torch.arange(2 * 4 * 5, dtype=torch.uint8).view(2, 4, 5)
    torch.manual_seed(0)
    crop = RandomCrop(4, padding=1)(image)
    assert crop.shape == (2, 4, 4)
    padded = torch.zeros(2, 6, 7, dtype=torch.uint8)
    padded[:, 1:5, 1:6] = image
    assert any(torch.equal(crop, padded[:, t : t + 4, l : l + 4]) for t in range(3) for l in range(4))
    assert torch.equal(RandomCrop(4)(image[:, :, :4]), image[:, :, :4])
    with pytest.raises(ValueError, match="smaller than the crop"):
        RandomCrop(8)(image)

    assert torch.equal(RandomHorizontalFlip(p=1.0)(image), image.flip(-1))
    assert torch.equal(RandomHorizontalFlip(p=0.0)(image), image)

    normalize = Normalize((0.5, 0.25), (0.5, 0.25))
    out = normalize(image)
    assert out.dtype == torch.float32 and out[1, 0, 0].item() == pytest.approx((20 / 255 - 0.25) / 0.25, abs=1e-6)
    assert image[1, 0, 0].item() == 20  # the input is never modified in place
    assert "Normalize" in repr(normalize)


def test_pil_transforms() -> None:
    """Resize, CenterCrop, PILToTensor and RandomResizedCrop on PIL images."""
    image = Image.new("RGB", (40, 30), (1, 2, 3))
    assert Resize(15)(image).size == (20, 15)
    assert Resize(15)(Image.new("RGB", (30, 45))).size == (15, 22)
    assert CenterCrop(10)(image).size == (10, 10)
    small = CenterCrop(50)(image)
    assert small.size == (50, 50) and small.getpixel((0, 0)) == (0, 0, 0) and small.getpixel((25, 25)) == (1, 2, 3)

    gradient = Image.fromarray(np.arange(30 * 40 * 3, dtype=np.uint32).reshape(30, 40, 3).astype(np.uint8))
    tensor = PILToTensor()(CenterCrop(10)(gradient))
    expected = torch.from_numpy(np.asarray(gradient)[10:20, 15:25].copy()).permute(2, 0, 1)
    assert tensor.dtype == torch.uint8 and torch.equal(tensor, expected)
    assert PILToTensor()(Image.new("L", (3, 2))).shape == (1, 2, 3)

    rrc = RandomResizedCrop(12)
    torch.manual_seed(1)
    boxes = [rrc.get_params(40, 30) for _ in range(50)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 30 - h and 0 <= left <= 40 - w and h > 0 and w > 0
        assert 0.08 * 1200 * 0.9 <= h * w <= 1200
    torch.manual_seed(1)
    assert [rrc.get_params(40, 30) for _ in range(50)] == boxes
    assert rrc(image).size == (12, 12)
    # Impossible scale for 10 attempts -> center-crop fallback with the aspect ratio clamped.
    assert RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0)).get_params(40, 30) == (0, 5, 30, 30)


def test_dataloader_batches(tmp_path: Path) -> None:
    """Datasets batch through a DataLoader, pickle, and index like sequences."""
    make_cifar10(tmp_path)
    splits = build_datasets("cifar10", tmp_path, val_fraction=0.2)
    batch_x, batch_y = next(iter(torch.utils.data.DataLoader(splits.train, batch_size=8, shuffle=True)))
    assert batch_x.shape == (8, 3, 32, 32) and batch_x.dtype == torch.float32 and batch_y.dtype == torch.int64
    assert torch.equal(pickle.loads(pickle.dumps(splits.val))[0][0], splits.val[0][0])
    with pytest.raises(IndexError):
        splits.val[len(splits.val)]
    assert torch.equal(splits.val[-1][0], splits.val[len(splits.val) - 1][0])


def test_augmentation_reproducible_with_dataloader_workers(tmp_path: Path) -> None:
    """Worker seeding derives from torch's global seed, so augmented epochs are reproducible."""
    make_cifar10(tmp_path)
    splits = build_datasets("cifar10", tmp_path, val_fraction=0.0, augment=True)

    def epoch() -> torch.Tensor:
        loader = torch.utils.data.DataLoader(splits.train, batch_size=10, shuffle=False, num_workers=2)
        return torch.cat([x for x, _ in loader])

    torch.manual_seed(7)
    first = epoch()
    torch.manual_seed(7)
    assert torch.equal(first, epoch())
    torch.manual_seed(8)
    assert not torch.equal(first, epoch())
