"""CIFAR loaders on tiny pickles written in the official python-version format."""

import pickle

import numpy as np
import pytest

from sslbench.data.cifar import load_cifar10, load_cifar100
from sslbench.errors import ConfigError, DataError

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _pickle(path, content):
    with open(path, "wb") as file:
        pickle.dump(content, file, protocol=2)


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


@pytest.fixture
def cifar10_root(tmp_path):
    """3 images per train batch and 4 test images, pixels and labels known."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = _images(15, 0)
    for b in range(5):
        rows = train[3 * b:3 * b + 3]
        _pickle(folder / f"data_batch_{b + 1}", {b"data": rows.reshape(3, -1), b"labels": [(3 * b + i) % 10 for i in range(3)],
                                                 b"batch_label": b"training batch", b"filenames": [b"x.png"] * 3})
    _pickle(folder / "test_batch", {b"data": _images(4, 1).reshape(4, -1), b"labels": [9, 8, 7, 6]})
    _pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in NAMES], b"num_vis": 3072})
    return tmp_path, train


def test_cifar10_round_trip(cifar10_root):
    root, train = cifar10_root
    data = load_cifar10(root, "train")
    assert data.images.shape == (15, 3, 32, 32)
    assert np.array_equal(data.images.numpy(), train)
    assert data.targets["class"].tolist() == [i % 10 for i in range(15)]
    assert data.num_classes == {"class": 10} and data.class_names == NAMES
    test = load_cifar10(root / "cifar-10-batches-py", "test")  # the folder itself works too
    assert np.array_equal(test.images.numpy(), _images(4, 1)) and test.targets["class"].tolist() == [9, 8, 7, 6]


def test_cifar10_limit_and_resize(cifar10_root):
    root, train = cifar10_root
    data = load_cifar10(root, "train", limit=4)
    assert np.array_equal(data.images.numpy(), train[:4]) and data.targets["class"].tolist() == [0, 1, 2, 3]
    resized = load_cifar10(root, "test", image_size=16)
    assert resized.images.shape == (4, 3, 16, 16) and resized.images.dtype.is_floating_point is False


def test_cifar100_fine_and_coarse(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    pixels = _images(5, 2)
    for split in ("train", "test"):
        _pickle(folder / split, {b"data": pixels.reshape(5, -1), b"fine_labels": [0, 99, 5, 42, 7], b"coarse_labels": [0, 19, 3, 4, 5]})
    _pickle(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                              b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    fine = load_cifar100(tmp_path, "train")
    assert np.array_equal(fine.images.numpy(), pixels) and fine.targets["class"].tolist() == [0, 99, 5, 42, 7]
    assert fine.num_classes == {"class": 100} and fine.class_names[99] == "f99"
    coarse = load_cifar100(folder, "test", labels="coarse")
    assert coarse.targets["class"].tolist() == [0, 19, 3, 4, 5] and coarse.num_classes == {"class": 20}
    with pytest.raises(ConfigError, match="fine, coarse"):
        load_cifar100(tmp_path, "train", labels="superclass")


def test_cifar_errors(cifar10_root, tmp_path):
    root, _ = cifar10_root
    with pytest.raises(DataError, match="not found; pass --data-root pointing at the folder that contains cifar-10-batches-py/"):
        load_cifar10(tmp_path / "missing", "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="cifar-10-batches-py/batches.meta"):
        load_cifar10(empty, "train")
    with pytest.raises(DataError, match="cifar-100-python/meta"):
        load_cifar100(root, "train")
    with pytest.raises(ConfigError, match="train, test"):
        load_cifar10(root, "val")
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02}q\x00(truncated")
    with pytest.raises(DataError, match="data_batch_3") as error:
        load_cifar10(root, "train")
    assert "\n" not in str(error.value)
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch not found"):
        load_cifar10(root, "test")
