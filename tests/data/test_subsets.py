import pytest
import torch

from sslbench.data.subsets import few_label_indices
from sslbench.errors import ConfigError, DataError

# 10 classes x 100 images, classes interleaved as in a shuffled dataset.
LABELS = torch.arange(1000) % 10


@pytest.mark.parametrize(("fraction", "per_class"), [(0.01, 1), (0.1, 10), (0.25, 25), (1.0, 100)])
def test_sizes_and_class_balance(fraction, per_class):
    indices = few_label_indices(LABELS, fraction, seed=0)
    assert len(indices) == 10 * per_class
    assert torch.bincount(LABELS[indices], minlength=10).tolist() == [per_class] * 10
    assert torch.equal(indices, indices.unique())  # sorted, no repeats


def test_at_least_one_per_class():
    # 1% of 50 images over 5 classes is 0.1 per class: each class still gets one.
    labels = torch.arange(50) % 5
    assert torch.bincount(labels[few_label_indices(labels, 0.01, seed=0)]).tolist() == [1] * 5


def test_small_class_gives_all_it_has():
    # 10% of 100 over 2 classes is 5 per class; the 3-image class gives 3.
    labels = torch.tensor([0] * 3 + [1] * 97)
    assert torch.bincount(labels[few_label_indices(labels, 0.1, seed=0)]).tolist() == [3, 5]


def test_seeded_reproducibility():
    first = few_label_indices(LABELS, 0.1, seed=3)
    assert torch.equal(first, few_label_indices(LABELS, 0.1, seed=3))
    assert not torch.equal(first, few_label_indices(LABELS, 0.1, seed=4))


def test_bad_fraction_and_labels():
    with pytest.raises(ConfigError, match="fraction"):
        few_label_indices(LABELS, 0.0, seed=0)
    with pytest.raises(ConfigError, match="fraction"):
        few_label_indices(LABELS, 1.5, seed=0)
    with pytest.raises(DataError, match="one class label per image"):
        few_label_indices(torch.zeros(4, 2, dtype=torch.int64), 0.5, seed=0)
