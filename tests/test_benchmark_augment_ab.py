"""benchmarks/augment_ab.py: the augmentation timed against another commit's, and their views compared."""

import sys


def test_the_augmentation_is_compared_with_another_commits(load_benchmark, monkeypatch, capsys):
    augment_ab = load_benchmark("augment_ab")
    monkeypatch.setattr(sys, "argv", ["augment_ab.py", "--old-commit", "HEAD", "--rounds", "1", "--threads", "1"])
    augment_ab.main()
    out = capsys.readouterr().out
    assert "old: ms per view" in out and "new: ms per view" in out
    assert "largest difference between the two versions' views: 0" in out  # HEAD's views are the working tree's
