"""The plain image-folder loader and the shared resize helpers."""

import numpy as np
import pytest
import torch
from PIL import Image

from sslbench.data.folder import ImageFiles, load_image_folder, resize_images, resize_map_nearest, resize_nearest, resize_rgb
from sslbench.errors import ConfigError, DataError


def _save(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _pixels(seed, size=(6, 8)):
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def test_flat_folder_is_unlabelled_sorted_and_rgb(tmp_path):
    _save(tmp_path / "b.png", _pixels(1))
    _save(tmp_path / "a.png", _pixels(0))
    _save(tmp_path / "nested" / "deeper" / "c.bmp", _pixels(2))
    Image.fromarray(_pixels(3)[..., 0]).save(tmp_path / "d.PNG")  # greyscale, upper-case extension
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path)
    assert data.images.shape == (4, 3, 6, 8) and data.targets == {}
    assert np.array_equal(data.images[0].permute(1, 2, 0).numpy(), _pixels(0))
    assert np.array_equal(data.images[2].permute(1, 2, 0).numpy(), _pixels(3)[..., [0, 0, 0]])
    assert np.array_equal(data.images[3].permute(1, 2, 0).numpy(), _pixels(2))
    assert len(load_image_folder(tmp_path, limit=2)) == 2


def test_class_subfolders_give_class_targets(tmp_path):
    for i, (name, cls) in enumerate([("x1", "dog"), ("x2", "cat"), ("x3", "dog"), ("x4", "bird")]):
        _save(tmp_path / "train" / cls / f"{name}.jpg", _pixels(i))
    data = load_image_folder(tmp_path, split="train", image_size=4)
    assert data.images.shape == (4, 3, 4, 4)
    assert data.class_names == ["bird", "cat", "dog"] and data.num_classes == {"class": 3}
    assert data.targets["class"].tolist() == [0, 1, 2, 2]  # bird/x4, cat/x2, dog/x1, dog/x3
    assert load_image_folder(tmp_path / "train", limit=1).num_classes == {"class": 3}


def test_mixed_sizes_need_image_size(tmp_path):
    _save(tmp_path / "a.png", _pixels(0, (6, 8)))
    _save(tmp_path / "b.png", _pixels(1, (10, 5)))
    with pytest.raises(DataError, match="pass --image-size"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, image_size=7).images.shape == (2, 3, 7, 7)


def test_corrupt_missing_and_empty(tmp_path):
    _save(tmp_path / "a.png", _pixels(0))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg: .*; remove or replace it") as error:
        load_image_folder(tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="not found; pass --data-root"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "empty")


def test_resize_helpers():
    flat = torch.full((2, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(resize_images(flat, 4), torch.full((2, 3, 4, 4), 77, dtype=torch.uint8))
    labels = torch.arange(16).reshape(1, 4, 4)
    assert resize_nearest(labels, 2).tolist() == [[[5, 7], [13, 15]]]  # centre pixels, no blending
    assert resize_nearest(labels, 8)[0, ::2, ::2].tolist() == labels[0].tolist()
    depth = torch.tensor([[[0.0, 2.0], [3.0, 4.0]]])
    assert resize_nearest(depth, 4).dtype == torch.float32 and set(resize_nearest(depth, 4).unique().tolist()) == {0.0, 2.0, 3.0, 4.0}


def test_pil_and_torch_resizers_agree():
    labels = np.random.default_rng(0).integers(0, 256, size=(13, 13), dtype=np.uint8)
    for size in (5, 8, 20):
        assert np.array_equal(resize_map_nearest(labels, size), resize_nearest(torch.from_numpy(labels), size).numpy())
    assert resize_map_nearest(labels.astype(np.float32), 5).dtype == np.float32
    image = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    by_pil = resize_rgb(image, 10).astype(int)
    by_torch = resize_images(torch.from_numpy(image).permute(2, 0, 1)[None], 10)[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(by_pil - by_torch).max() <= 2  # both antialiased bilinear, rounding differs


def test_image_files_decode_the_pixels_of_the_in_memory_loader(tmp_path):
    for i in range(6):
        _save(tmp_path / "train" / f"{i}.png", _pixels(i, (6, 8) if i % 2 else (10, 5)))
    loaded = load_image_folder(tmp_path, image_size=7).images
    files = ImageFiles.from_folder(tmp_path, 7)
    assert len(files) == 6 and files.image_size == 7 and files.path(0) == tmp_path / "train" / "0.png"
    batch = files.decode(torch.tensor([4, 0, 5]))
    assert batch.dtype == torch.uint8 and torch.equal(batch, loaded[[4, 0, 5]])
    assert torch.equal(files.sample(6, torch.Generator().manual_seed(0)), loaded)  # every image, in path order
    assert len(ImageFiles.from_folder(tmp_path, 7, limit=2)) == 2


def test_image_files_sample_is_a_seeded_subset_in_path_order(tmp_path):
    for i in range(8):
        _save(tmp_path / f"{i}.png", _pixels(i, (4, 4)))
    loaded = load_image_folder(tmp_path).images
    files = ImageFiles.from_folder(tmp_path, 4)
    rows = []
    for seed in range(6):
        sample = files.sample(3, torch.Generator().manual_seed(seed))
        assert torch.equal(sample, files.sample(3, torch.Generator().manual_seed(seed)))
        matches = [next(i for i in range(8) if torch.equal(image, loaded[i])) for image in sample]
        assert len(set(matches)) == 3 and matches == sorted(matches)
        rows.append(tuple(matches))
    assert len(set(rows)) > 1  # the seed picks the subset


def test_image_files_report_corrupt_files_and_bad_sizes_like_the_loader(tmp_path):
    _save(tmp_path / "a.png", _pixels(0))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    files = ImageFiles.from_folder(tmp_path, 4)  # listing decodes nothing
    assert files.decode([0]).shape == (1, 3, 4, 4)
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg: .*; remove or replace it") as error:
        files.decode([1, 0])
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="image size 0 is out of range; pass a positive --image-size"):
        ImageFiles.from_folder(tmp_path, 0)
    with pytest.raises(DataError, match="not found; pass --data-root"):
        ImageFiles.from_folder(tmp_path / "missing", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFiles.from_folder(tmp_path / "empty", 4)
