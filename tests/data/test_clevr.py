"""CLEVR count loader on a tiny copy of the official layout."""

import json

import numpy as np
import pytest
from PIL import Image

from sslbench.data.clevr import load_clevr
from sslbench.errors import ConfigError, DataError

COUNTS = [3, 2, 10, 5, 11, 7]


@pytest.fixture
def clevr_root(tmp_path):
    folder = tmp_path / "CLEVR_v1.0"
    (folder / "scenes").mkdir(parents=True)
    for split in ("train", "val"):
        (folder / "images" / split).mkdir(parents=True)
        scenes = []
        for i, count in enumerate(COUNTS):
            name = f"CLEVR_{split}_{i:06d}.png"
            rgba = np.full((4, 6, 4), [10 * i, 1, 2, 255], dtype=np.uint8)  # official images are RGBA
            Image.fromarray(rgba, "RGBA").save(folder / "images" / split / name)
            scenes.append({"image_index": i, "image_filename": name, "objects": [{"shape": "cube"}] * count})
        (folder / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps({"info": {}, "scenes": scenes}))
    (folder / "images" / "test").mkdir()
    return tmp_path


def test_clevr_counts_in_range(clevr_root):
    data = load_clevr(clevr_root, "train")
    assert data.images.shape == (4, 3, 4, 6)  # counts 2 and 11 are out of 3..10
    assert data.targets["count"].tolist() == [0, 7, 2, 4]
    assert data.num_classes == {"count": 8} and data.class_names == [str(c) for c in range(3, 11)]
    assert data.images[:, 0, 0, 0].tolist() == [0, 20, 30, 50]


def test_clevr_core_range_limit_resize(clevr_root):
    data = load_clevr(clevr_root / "CLEVR_v1.0", "val", count_range=(3, 7), image_size=3, limit=2)
    assert data.images.shape == (2, 3, 3, 3)
    assert data.targets["count"].tolist() == [0, 2] and data.num_classes == {"count": 5}


def test_clevr_errors(clevr_root, tmp_path):
    with pytest.raises(DataError, match="split 'test' has no scene annotations.*use split 'val'"):
        load_clevr(clevr_root, "test")
    with pytest.raises(DataError, match="not found; pass --data-root pointing at the folder that contains CLEVR_v1.0/"):
        load_clevr(tmp_path / "missing", "train")
    with pytest.raises(ConfigError, match="train, val, test"):
        load_clevr(clevr_root, "validation")
    with pytest.raises(ConfigError, match="count_range"):
        load_clevr(clevr_root, "train", count_range=(5, 3))
    with pytest.raises(DataError, match="between 20 and 30 objects"):
        load_clevr(clevr_root, "train", count_range=(20, 30))
    folder = clevr_root / "CLEVR_v1.0"
    (folder / "images" / "val" / "CLEVR_val_000000.png").unlink()
    with pytest.raises(DataError, match="CLEVR_val_000000.png not found"):
        load_clevr(clevr_root, "val")
    (folder / "scenes" / "CLEVR_train_scenes.json").write_text('{"scenes": [')
    with pytest.raises(DataError, match="cannot read CLEVR scene file .*CLEVR_train_scenes.json"):
        load_clevr(clevr_root, "train")
