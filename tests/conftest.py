"""Test-wide settings."""

import importlib.util
import sys
from pathlib import Path

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
