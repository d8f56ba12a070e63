"""Task suite mini (../shared/BENCHMARKS.md): the downstream tasks on real data where it exists, pretrained vs random.

One encoder pretrained elsewhere (``--encoder``, an output folder of ``sslbench pretrain`` or of
``benchmarks/c10_mini.py``) and the same backbone at random initialisation (seed 0) are evaluated, with one
protocol budget each, on:

- Segmentation: the Oxford-IIIT Pet subset of ../shared/data (3 breeds, 300 ``trainval`` images, no ``test``
  list), 128x128, trimaps -> pet / background with the border ignored, mIoU. The subset has no test split, so
  every 5th image of ``trainval.txt`` (60) is the test set and the other 240 train: a fixed, breed-balanced
  split (the list is sorted by breed). DeepLabV3+ probe on the frozen encoder, and fine-tuning (encoder at
  ``ENCODER_LR_SCALE`` x the head's lr). If fine-tuning does not beat the probe, a small sweep of the encoder's
  learning rate runs too, to show why.
- Counting: the CLEVR tiny sample (train 100 / val 20, 128x128): a smoke test of the real format, not a
  measurement (20 test images).
- Depth: the procedural scenes (no real depth data exists on these machines), 32x32, 4000 / 1000, U-Net probe.

Every evaluation appends rows to ``OUT/results.jsonl`` (with a ``cell`` field); a rerun skips cells already
there, so a killed run resumes. The report is rendered from those rows.

    python benchmarks/tasks_mini.py --data-root DIR --encoder RUN_DIR --report benchmarks/results/tasks_mini.md

DIR holds ``oxford-iiit-pet/`` and ``CLEVR_v1.0/`` (``python ../shared/data/materialize.py DIR pets clevr``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import lightning
import torch

import sslbench
from sslbench.data import ImageSet, load_dataset
from sslbench.evaluation import EncoderUnderTest, checkpoint_subject, evaluate, random_subject
from sslbench.results import HEADLINE_METRIC, format_cell, load_rows, results_path
from sslbench.tasks import ProbeConfig
from sslbench.tasks.probe import ENCODER_LR_SCALE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from c10_mini import cpu_model  # noqa: E402  (benchmarks/ is a folder of scripts)

PET_SIZE = 128
PET_TEST_EVERY = 5
SWEEP_ENCODER_LRS = (1e-5, 1e-3)
"""Encoder learning rates tried, on the pretrained encoder, when fine-tuning loses to the probe (the default is
ENCODER_LR_SCALE x the head's 1e-3 = 1e-4): one step of 10x down and up each, which shows the direction to move in."""


@dataclass(frozen=True)
class Section:
    """One dataset x task with its protocols and probe budget."""

    name: str
    dataset: str
    task: str
    protocols: tuple[str, ...]
    probe: ProbeConfig


def pet_splits(root: Path) -> tuple[ImageSet, ImageSet]:
    """The 240 / 60 split of the 300-image ``trainval`` subset (every 5th listed image is a test image)."""
    pets = load_dataset("pets", root, "trainval", image_size=PET_SIZE)
    order = torch.arange(len(pets))
    is_test = order % PET_TEST_EVERY == PET_TEST_EVERY - 1
    return pets.subset(order[~is_test]), pets.subset(order[is_test])


def load_section_data(section: Section, root: Path) -> tuple[ImageSet, ImageSet]:
    if section.dataset == "pets":
        return pet_splits(root)
    if section.dataset == "clevr":
        return (load_dataset("clevr", root, "train", image_size=PET_SIZE),
                load_dataset("clevr", root, "val", image_size=PET_SIZE))
    return (load_dataset("scenes", None, "train", image_size=32, limit=4000),
            load_dataset("scenes", None, "test", image_size=32, limit=1000))


def sections(epochs: int) -> list[Section]:
    dense = ProbeConfig(epochs=epochs, dense_batch_size=16, decoder_width=32, finest_stride=2)
    return [
        Section("segmentation: Oxford-IIIT Pet subset", "pets", "segmentation", ("probe", "finetune"), dense),
        Section("counting: CLEVR tiny (smoke)", "clevr", "counting", ("linear", "conv"), replace(dense, batch_size=32)),
        Section("depth: procedural scenes", "scenes", "depth", ("probe",), replace(dense, dense_batch_size=64)),
    ]


def cell_id(section: Section, subject: EncoderUnderTest, protocol: str, seed: int, encoder_lr: float | None) -> str:
    lr = "" if encoder_lr is None else f"|encoder_lr={encoder_lr:g}"
    return f"{section.dataset}|{section.task}|{subject.method}|{subject.checkpoint}|{protocol}|{seed}{lr}"


def done_cells(out: Path) -> set[str]:
    return {row["cell"] for row in load_rows(out) if "cell" in row} if results_path(out).is_file() else set()


def run_cell(section: Section, subject: EncoderUnderTest, protocol: str, seed: int, encoder_lr: float | None,
             splits: tuple[ImageSet, ImageSet], out: Path, done: set[str]) -> None:
    cell = cell_id(section, subject, protocol, seed, encoder_lr)
    if cell in done:
        return
    probe = replace(section.probe, seed=seed, encoder_lr=encoder_lr)
    start = time.perf_counter()
    metrics = evaluate(subject, section.task, protocol, section.dataset, *splits, probe, out,
                       extra={"cell": cell, "encoder_lr": probe.encoder_learning_rate if protocol == "finetune" else None})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "trainable_params")
    print(f"{cell}: {shown} ({time.perf_counter() - start:.0f} s)", flush=True)
    done.add(cell)


def cell_values(rows: list[dict], dataset: str, method: str, protocol: str, metric: str,
                encoder_lr: float | None = None) -> list[float]:
    return [row["value"] for row in rows
            if row["dataset"] == dataset and row["method"] == method and row["protocol"] == protocol
            and row["metric"] == metric and (encoder_lr is None or row.get("encoder_lr") == encoder_lr)
            and ("|encoder_lr=" in row["cell"]) == (encoder_lr is not None)]


def metric_label(task: str) -> tuple[str, str]:
    """The task's headline metric and its column label (``rmse ↓``), as the library's tables name them."""
    metric, lower_is_better = HEADLINE_METRIC[task]
    return metric, f"{metric} {'↓' if lower_is_better else '↑'}"


def report(rows: list[dict], subjects: list[EncoderUnderTest], args: argparse.Namespace, seconds: float) -> str:
    methods = [s.method for s in subjects]
    lines = [
        "# Task suite mini (`../shared/BENCHMARKS.md`): pretrained vs random init on the downstream tasks", "",
        f"- Command: `{' '.join(sys.argv)}`",
        f"- Date: {date.today()}. Machine: {cpu_model()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, lightning {lightning.__version__}, sslbench {sslbench.__version__}.",
        f"- Encoders: `{args.encoder}` (method {methods[0]}, {subjects[0].epochs} epochs) and the same backbone at random "
        f"init (seed 0). Probe seeds: {', '.join(map(str, args.seeds))}; fine-tuning seeds: "
        f"{', '.join(map(str, args.finetune_seeds))} (mean ± sample std where there are several).",
        f"- Probe budget: {args.probe_epochs} epochs, AdamW lr {ProbeConfig.lr:g} (head), wd {ProbeConfig.weight_decay:g}; "
        f"fine-tuning trains the encoder at "
        f"{ENCODER_LR_SCALE} x the head's lr unless a row says otherwise. Dense heads: width 32, maps of stride >= 2.",
        f"- Wall time of this invocation: {seconds:.0f} s (cells already in the results were skipped).",
        f"- Rows: `{results_path(args.out)}`.", "",
    ]
    for section in sections(args.probe_epochs):
        metric, label = metric_label(section.task)
        lines += [f"## {section.name}", "", "| encoder | " + " | ".join(f"{p} {label}" for p in section.protocols) + " |",
                  "|---|" + "---|" * len(section.protocols)]
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(format_cell(cell_values(rows, section.dataset, method, p, metric))
                                                       for p in section.protocols) + " |")
        sweep = sorted({row["encoder_lr"] for row in rows if row["dataset"] == section.dataset and "|encoder_lr=" in row["cell"]})
        if sweep:
            lines += ["", f"Fine-tuning, encoder learning-rate sweep ({metric}; the head stays at {section.probe.lr:g}):", "",
                      "| encoder | " + " | ".join(f"{lr:g}" for lr in sweep) + " | |", "|---|" + "---|" * (len(sweep) + 1)]
            default = format_cell(cell_values(rows, section.dataset, methods[0], "finetune", metric))
            lines.append(f"| {methods[0]} | " + " | ".join(format_cell(cell_values(rows, section.dataset, methods[0], "finetune", metric, lr))
                                                           for lr in sweep) + f" | (default {section.probe.encoder_learning_rate:g}: {default}) |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path, help="Folder with oxford-iiit-pet/ and CLEVR_v1.0/.")
    parser.add_argument("--encoder", required=True, type=Path, help="Output folder of a pretraining run.")
    parser.add_argument("--report", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/tasks_mini"), help="Folder of results.jsonl.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=[0],
                        help="Fine-tuning costs ~10x a probe on CPU, so it runs on fewer seeds by default.")
    parser.add_argument("--probe-epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    pretrained = checkpoint_subject(args.encoder)
    random = random_subject(pretrained.encoder.spec, f"random-{pretrained.encoder.spec['backbone']}", seed=0)
    subjects = [pretrained, random]
    done = done_cells(args.out)
    for section in sections(args.probe_epochs):
        splits = load_section_data(section, args.data_root)
        for protocol in section.protocols:
            for subject in subjects:
                for seed in args.finetune_seeds if protocol == "finetune" else args.seeds:
                    run_cell(section, subject, protocol, seed, None, splits, args.out, done)
        if "finetune" in section.protocols:
            rows = load_rows(args.out)
            metric = HEADLINE_METRIC[section.task][0]
            tuned = cell_values(rows, section.dataset, pretrained.method, "finetune", metric)
            probed = cell_values(rows, section.dataset, pretrained.method, "probe", metric)
            if statistics.fmean(tuned) <= statistics.fmean(probed):
                for encoder_lr in SWEEP_ENCODER_LRS:
                    run_cell(section, pretrained, "finetune", args.finetune_seeds[0], encoder_lr, splits, args.out, done)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report(load_rows(args.out), subjects, args, time.perf_counter() - start))
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
