"""NYU Depth V2 loader: the labeled .mat release and the folder layout with 16-bit depth PNGs."""

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from sslbench.data.nyu import load_nyu, nyu_eval_crop
from sslbench.errors import ConfigError, DataError

N, H, W = 5, 6, 8


def _rgb(n):
    return np.random.default_rng(0).integers(0, 256, size=(n, 3, H, W), dtype=np.uint8)


def _depth(n):
    return np.random.default_rng(1).uniform(0.5, 10.0, size=(n, H, W)).astype(np.float32)


@pytest.fixture
def mat_root(tmp_path):
    """The labeled release: HDF5 datasets stored with H and W swapped, as MATLAB v7.3 writes them."""
    with h5py.File(tmp_path / "nyu_depth_v2_labeled.mat", "w") as mat:
        mat["images"] = _rgb(N).transpose(0, 1, 3, 2)
        mat["depths"] = _depth(N).transpose(0, 2, 1)
        mat["labels"] = np.zeros((N, W, H), dtype=np.uint16)
    scipy.io.savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1.0], [2.0], [4.0]]), "testNdxs": np.array([[5.0], [3.0]])})
    return tmp_path


def test_labeled_mat_official_split(mat_root):
    train = load_nyu(mat_root, "train")
    assert train.images.shape == (3, 3, H, W) and train.targets["depth"].shape == (3, H, W)
    assert np.array_equal(train.images.numpy(), _rgb(N)[[0, 1, 3]])
    assert train.targets["depth"].dtype.is_floating_point and np.array_equal(train.targets["depth"].numpy(), _depth(N)[[0, 1, 3]])
    test = load_nyu(mat_root, "test", limit=2)  # split order kept even when not increasing
    assert np.array_equal(test.images.numpy(), _rgb(N)[[4, 2]])
    small = load_nyu(mat_root, "test", image_size=4)
    assert small.images.shape == (2, 3, 4, 4)
    assert set(np.unique(small.targets["depth"].numpy())) <= set(np.unique(_depth(N)))  # nearest: no blended depths


def test_folder_layout_with_16_bit_png(tmp_path):
    rgb, millimetres = _rgb(2), np.array([[[0, 1000] * (W // 2)] * H, [[65535, 2500] * (W // 2)] * H], dtype=np.uint16)
    (tmp_path / "scene").mkdir()
    lines = []
    for i in range(2):
        Image.fromarray(rgb[i].transpose(1, 2, 0)).save(tmp_path / "scene" / f"rgb_{i}.png")
        Image.fromarray(millimetres[i]).save(tmp_path / "scene" / f"depth_{i}.png")
        lines.append(f"scene/rgb_{i}.png,scene/depth_{i}.png")
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    data = load_nyu(tmp_path, "test")
    assert np.array_equal(data.images.numpy(), rgb)
    assert np.allclose(data.targets["depth"].numpy(), millimetres / 1000.0)
    assert data.targets["depth"][0, 0, 0] == 0  # invalid stays 0
    assert load_nyu(tmp_path, "test", image_size=3, limit=1).targets["depth"].shape == (1, 3, 3)
    Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(tmp_path / "scene" / "depth_1.png")
    with pytest.raises(DataError, match="depth_1.png has mode L; expected a 16-bit PNG"):
        load_nyu(tmp_path, "test")
    (tmp_path / "train.txt").write_text("scene/rgb_0.png\n")
    with pytest.raises(DataError, match="train.txt line 1"):
        load_nyu(tmp_path, "train")


def test_nyu_errors(mat_root, tmp_path):
    with pytest.raises(DataError, match="not found; pass --data-root pointing at the folder that contains nyu_depth_v2_labeled.mat"):
        load_nyu(tmp_path / "missing", "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="expected nyu_depth_v2_labeled.mat \\+ splits.mat .* or train.csv"):
        load_nyu(empty, "train")
    with pytest.raises(ConfigError, match="train, test"):
        load_nyu(mat_root, "val")
    (mat_root / "splits.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="cannot read NYU split file .*splits.mat"):
        load_nyu(mat_root, "train")
    (mat_root / "splits.mat").unlink()
    with pytest.raises(DataError, match="splits.mat not found"):
        load_nyu(mat_root, "train")
    scipy.io.savemat(mat_root / "splits.mat", {"trainNdxs": np.array([[1]]), "testNdxs": np.array([[2]])})
    (mat_root / "nyu_depth_v2_labeled.mat").write_bytes(b"truncated")
    with pytest.raises(DataError, match="cannot read NYU file .*nyu_depth_v2_labeled.mat") as error:
        load_nyu(mat_root, "train")
    assert "\n" not in str(error.value)


def test_eigen_crop():
    assert nyu_eval_crop(480, 640) == (45, 471, 41, 601)
    assert nyu_eval_crop(240, 320) == (22, 235, 20, 300)
    assert nyu_eval_crop(64, 64) == (6, 62, 4, 60)
