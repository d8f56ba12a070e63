"""Oxford-IIIT Pet loader on a tiny copy of the official layout."""

import numpy as np
import pytest
from PIL import Image

from sslbench.data.base import IGNORE_INDEX
from sslbench.data.pets import PET_BREEDS, load_pets
from sslbench.errors import ConfigError, DataError

# name, class id (1..37), species (1 cat, 2 dog), breed id
ENTRIES = [("Abyssinian_1", 1, 1, 1), ("american_bulldog_7", 2, 2, 1), ("Bengal_3", 6, 1, 2)]


def _trimap(seed):
    return np.random.default_rng(seed).integers(1, 4, size=(6, 10), dtype=np.uint8)


@pytest.fixture
def pets_root(tmp_path):
    folder = tmp_path / "oxford-iiit-pet"
    (folder / "images").mkdir(parents=True)
    (folder / "annotations" / "trimaps").mkdir(parents=True)
    for i, (name, *_) in enumerate(ENTRIES):
        Image.fromarray(np.full((6, 10, 3), 40 * i, dtype=np.uint8)).save(folder / "images" / f"{name}.jpg", quality=100)
        Image.fromarray(_trimap(i)).save(folder / "annotations" / "trimaps" / f"{name}.png")
    lines = [f"{n} {c} {s} {b}" for n, c, s, b in ENTRIES]
    (folder / "annotations" / "trainval.txt").write_text("\n".join(lines[:2]) + "\n")
    (folder / "annotations" / "test.txt").write_text("#Image CLASS-ID SPECIES BREED ID\n" + lines[2] + "\n")
    return tmp_path


def test_pets_trainval_targets(pets_root):
    data = load_pets(pets_root, "trainval")
    assert data.images.shape == (2, 3, 6, 10) and abs(int(data.images[1].float().mean()) - 40) <= 1
    assert data.targets["class"].tolist() == [0, 1] and data.targets["species"].tolist() == [0, 1]
    assert data.num_classes == {"class": 37, "species": 2, "mask": 2}
    assert data.class_names[0] == "Abyssinian" and data.class_names[5] == "Bengal" and len(PET_BREEDS) == 37
    trimap, mask = _trimap(0), data.targets["mask"][0].numpy()
    assert np.array_equal(mask == 1, trimap == 1) and np.array_equal(mask == 0, trimap == 2)
    assert np.array_equal(mask == IGNORE_INDEX, trimap == 3)
    assert load_pets(pets_root / "oxford-iiit-pet", "train", limit=1).targets["class"].tolist() == [0]


def test_pets_three_mask_classes_resize_and_test_split(pets_root):
    data = load_pets(pets_root, "test", image_size=5, mask_classes=3)
    assert data.images.shape == (1, 3, 5, 5) and data.targets["mask"].shape == (1, 5, 5)
    assert set(data.targets["mask"].unique().tolist()) <= {0, 1, 2} and data.num_classes["mask"] == 3
    assert data.targets["class"].tolist() == [5]
    no_masks = load_pets(pets_root, "trainval", with_masks=False)
    assert "mask" not in no_masks.targets and "mask" not in no_masks.num_classes


def test_pets_errors(pets_root, tmp_path):
    with pytest.raises(DataError, match="not found; pass --data-root pointing at the folder that contains oxford-iiit-pet/"):
        load_pets(tmp_path / "missing", "trainval")
    with pytest.raises(ConfigError, match="trainval, train, test"):
        load_pets(pets_root, "val")
    with pytest.raises(ConfigError, match="mask_classes"):
        load_pets(pets_root, "trainval", mask_classes=4)
    folder = pets_root / "oxford-iiit-pet"
    Image.fromarray(np.zeros((6, 10), dtype=np.uint8)).save(folder / "annotations" / "trimaps" / "Bengal_3.png")
    with pytest.raises(DataError, match="Bengal_3.png has values outside 1..3"):
        load_pets(pets_root, "test")
    Image.fromarray(np.ones((4, 4), dtype=np.uint8)).save(folder / "annotations" / "trimaps" / "Bengal_3.png")
    with pytest.raises(DataError, match="Bengal_3.png has shape"):
        load_pets(pets_root, "test")
    (folder / "images" / "Abyssinian_1.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read image .*Abyssinian_1.jpg"):
        load_pets(pets_root, "trainval")
    (folder / "annotations" / "trainval.txt").write_text("Abyssinian_1 one 1 1\n")
    with pytest.raises(DataError, match="trainval.txt line 1"):
        load_pets(pets_root, "trainval")
    (folder / "annotations" / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt not found"):
        load_pets(pets_root, "test")
