"""Test-wide settings."""

import sys

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
