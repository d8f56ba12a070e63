"""Test-wide settings."""

import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny shapes: one thread is fastest, and OpenMP threads spin badly on a shared, busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run ``sslbench ARGS...`` in-process: (exit code, stdout, stderr)."""
    from sslbench.cli import main

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["sslbench", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark(NAME)`` imports ``benchmarks/NAME.py`` (a folder of scripts, not a package), afresh on each call.
    It is registered in ``sys.modules`` while it runs, as dataclasses defined in it look their module up."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def write_cifar10():
    """``write_cifar10(ROOT, train_per_batch, test)`` writes random pixels (labels cycling 0-9) in CIFAR-10's official
    python layout under ``ROOT/cifar-10-batches-py``: the benchmarks' input, without the real data."""

    def write(root: Path, train_per_batch: int, test: int) -> None:
        folder = root / "cifar-10-batches-py"
        folder.mkdir()
        rng = np.random.default_rng(0)
        batches = [(f"data_batch_{b + 1}", train_per_batch) for b in range(5)] + [("test_batch", test)]
        for name, n in batches:
            with open(folder / name, "wb") as file:
                pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}, file)
        with open(folder / "batches.meta", "wb") as file:
            pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, file)

    return write
