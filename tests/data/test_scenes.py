"""The procedural scenes: label formats, determinism, and that the four labels describe one consistent scene."""

import pytest
import torch

from sslbench.data.scenes import MAX_COUNT, MAX_DEPTH, SCENE_CLASS_NAMES, SCENE_SPLIT_SIZES, load_scenes
from sslbench.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def scenes():
    return load_scenes(split="train", image_size=32, limit=50)


def test_shapes_dtypes_and_metadata(scenes):
    assert scenes.name == "scenes"
    assert scenes.images.shape == (50, 3, 32, 32) and scenes.images.dtype == torch.uint8
    targets = scenes.targets
    assert targets["class"].shape == (50,) and targets["class"].dtype == torch.int64
    assert targets["count"].shape == (50,) and targets["count"].dtype == torch.int64
    assert targets["mask"].shape == (50, 32, 32) and targets["mask"].dtype == torch.int64
    assert targets["depth"].shape == (50, 32, 32) and targets["depth"].dtype == torch.float32
    assert scenes.num_classes == {"class": 10, "count": 7, "mask": 11}
    assert scenes.class_names == SCENE_CLASS_NAMES and len(set(SCENE_CLASS_NAMES)) == 10
    assert SCENE_SPLIT_SIZES == {"train": 20000, "test": 5000}
    assert targets["class"].min() >= 0 and targets["class"].max() <= 9
    assert targets["count"].min() >= 1 and targets["count"].max() <= MAX_COUNT


def test_deterministic_and_prefix_invariant(scenes):
    prefix = load_scenes(split="train", image_size=32, limit=10)
    assert torch.equal(prefix.images, scenes.images[:10])
    for key, value in prefix.targets.items():
        assert torch.equal(value, scenes.targets[key][:10]), key
    other_split = load_scenes(split="test", image_size=32, limit=10)
    assert not torch.equal(other_split.images, prefix.images)


def test_mask_holds_one_class_per_scene_and_count_matches_visible_objects(scenes):
    targets = scenes.targets
    for mask, depth, label, count in zip(targets["mask"], targets["depth"], targets["class"], targets["count"]):
        objects = mask > 0
        assert objects.any()
        assert set(mask[objects].unique().tolist()) == {int(label) + 1}
        # Each object stands at its own depth, so the visible objects are the distinct object depths.
        assert len(depth[objects].unique()) == int(count)


def test_depth_is_positive_and_objects_stand_in_front_of_the_ground(scenes):
    depth, mask = scenes.targets["depth"], scenes.targets["mask"]
    assert (depth > 0).all() and (depth <= MAX_DEPTH).all()
    for scene_depth, scene_mask in zip(depth, mask):
        for row in range(scene_depth.shape[0]):
            ground = scene_depth[row][scene_mask[row] == 0]
            if len(ground) == 0:
                continue
            # The ground's depth depends only on the row...
            assert torch.allclose(ground, ground[0].expand_as(ground))
            # ...and anything standing on it is no farther than the ground behind it.
            assert (scene_depth[row][scene_mask[row] > 0] <= ground[0] + 1e-5).all()
    # Ground recedes toward the top of the image: never nearer higher up.
    ground_rows = torch.where(mask == 0, depth, torch.nan).nanmean(dim=2)
    steps = ground_rows[:, :-1] - ground_rows[:, 1:]
    assert (steps[~steps.isnan()] >= -1e-5).all()


def test_size_64_works():
    scenes = load_scenes(split="test", image_size=64, limit=4)
    assert scenes.images.shape == (4, 3, 64, 64)
    assert scenes.targets["mask"].shape == (4, 64, 64) and scenes.targets["depth"].shape == (4, 64, 64)


def test_root_is_ignored_and_limit_zero_gives_an_empty_set(tmp_path):
    empty = load_scenes(tmp_path / "missing", split="train", image_size=16, limit=0)
    assert len(empty) == 0 and empty.images.shape == (0, 3, 16, 16)
    with pytest.raises(ConfigError, match="limit"):
        load_scenes(limit=-1)


def test_bad_split_raises_data_error():
    with pytest.raises(DataError, match="train, test"):
        load_scenes(split="val")


@pytest.mark.parametrize("size", [8, 15, 32.0, True])
def test_bad_image_size_raises_config_error(size):
    with pytest.raises(ConfigError, match="image_size"):
        load_scenes(image_size=size, limit=1)
