"""SimCLR on C10-mini (../shared/BENCHMARKS.md), side by side: sslbench's engine against the ``lightly`` library.

Both libraries train the same CIFAR ResNet-18 at quarter width (built from the same spec after the same seed)
with the protocol's recipe (batch 256 drop last, SGD 0.06 / 0.9 / 5e-4 cosine per step, NT-Xent T = 0.5,
head 128-512-128, lightly's ``SimCLRTransform`` augmentations with blur off). Each library runs in its own
worker process, so its memory is its own; the parent hands out epochs alternately (A B, B A, A B, ...), so a
drift of the machine's speed hits both, and only one trains at any time. The parent samples the resident
memory of each worker's process tree (the worker plus its DataLoader workers) while that worker trains, and
evaluates every exported encoder with one kNN function (k = 200, T = 0.1) after epochs 5, 10 and 15, outside
the timed epochs.

    python benchmarks/speed_vs_lightly.py --data-root DIR --report benchmarks/results/speed.md
    python benchmarks/speed_vs_lightly.py --data-root DIR --report /tmp/smoke.md --limit 512 --epochs 1

DIR holds ``cifar-10-batches-py/`` (``python ../shared/data/materialize.py DIR cifar10``). ``lightly`` is the
benchmark-only extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from c10_mini import RECIPES, RESNET, cpu_model, raw_pixel_knn  # noqa: E402  (benchmarks/ is a folder of scripts)

LIBRARIES = ("sslbench", "lightly")
KNN_EPOCHS = (5, 10, 15)


@dataclass
class Settings:
    """What both workers need to set up the same run; sslbench's side runs ``method`` with ``recipe``
    (a ``c10_mini.RECIPES`` entry) at ``precision``, and the encoders are reported after ``knn_at`` epochs."""

    data_root: Path
    epochs: int
    limit: int | None
    threads: int
    out: Path
    method: str = "simclr"
    recipe: dict[str, Any] = field(default_factory=lambda: RECIPES["simclr"])
    precision: str = "32-true"
    knn_at: tuple[int, ...] = KNN_EPOCHS
    seed: int = 0
    """Both libraries' seed: the same initial weights, and each library's own augmentation and batch-order stream."""
    compile: bool = False
    """``torch.compile`` on both sides (sslbench: the engine's ``--compile``); compilation falls in epoch 1."""


@dataclass
class EpochReport:
    """One trained epoch as a worker reports it; ``encoder_state`` only after a kNN epoch.

    The state travels as numpy arrays: torch tensors sent through a pipe go by shared memory, which the
    receiver cannot open once the sender has exited (as a worker does after its last epoch).
    """

    seconds: float
    images: int
    loss: float
    encoder_state: dict[str, Any] | None = None


@dataclass
class LibraryRun:
    """Everything the parent measured for one library."""

    epoch_seconds: list[float] = field(default_factory=list)
    images: int = 0
    losses: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    knn_top1: dict[int, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / sum(self.epoch_seconds)

    @property
    def seconds_per_epoch(self) -> float:
        return sum(self.epoch_seconds) / len(self.epoch_seconds)


def numpy_state(module: torch.nn.Module) -> dict[str, Any]:
    return {name: value.detach().numpy().copy() for name, value in module.state_dict().items()}


def knn_epochs(settings: Settings) -> list[int]:
    """The epochs after which a worker sends its encoder: ``knn_at`` up to the last epoch, and the last."""
    return sorted({e for e in settings.knn_at if e <= settings.epochs} | {settings.epochs})


def training_images(settings: Settings):
    from sslbench.data import load_dataset

    return load_dataset("cifar10", settings.data_root, "train", limit=settings.limit or 10_000)


# --- memory of a process tree ------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc/PID/task/TID/children (Linux)."""
    tree, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the process or thread ended while we looked
                continue
            tree.extend(children)
            frontier.extend(children)
    return tree


def tree_rss_mb(pid: int) -> float:
    """Resident memory summed over the process tree (pages shared by forked workers count once per process)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for member in process_tree(pid):
        try:
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * page
        except OSError:
            continue
    return total / 2**20


class PeakRss:
    """Samples a process tree's resident memory in a thread (every ``interval`` s) and keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval, self.peak_mb = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, tree_rss_mb(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, tree_rss_mb(self.pid))


# --- workers -----------------------------------------------------------------------------------------
def sslbench_worker(settings: Settings, conn) -> None:
    """sslbench's own C10-mini run of ``settings.method`` (SimCLR unless told), paused between epochs until the parent says go."""
    from lightning.pytorch.callbacks import Callback

    from sslbench.engine import RunConfig, TrainingStats, pretrain

    torch.set_num_threads(settings.threads)
    images = training_images(settings).images
    report_at = knn_epochs(settings)

    class Turnstile(Callback):
        """Waits for the parent before the first epoch and after each epoch's report (outside the epoch timer)."""

        def on_train_start(self, trainer, pl_module) -> None:
            conn.recv()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            stats = next(c for c in trainer.callbacks if isinstance(c, TrainingStats))
            epoch = trainer.current_epoch + 1
            state = numpy_state(pl_module.export_encoder()) if epoch in report_at else None
            conn.send(EpochReport(stats.epoch_seconds[-1], stats.images_seen[-1], stats.epoch_losses[-1], state))
            if epoch < settings.epochs:
                conn.recv()

    recipe = settings.recipe
    out = settings.out / "sslbench"
    shutil.rmtree(out, ignore_errors=True)
    pretrain(settings.method, images, RunConfig(out=out, accelerator="cpu", devices="1", precision=settings.precision, progress=False,
                                                   compile=settings.compile),
             backbone=recipe["backbone"], options=recipe["options"],
             train={**recipe["train"], "epochs": settings.epochs, "seed": settings.seed}, callbacks=[Turnstile()])


class PilImages(torch.utils.data.Dataset):
    """The uint8 images as PIL images through a per-image transform: the common torchvision-style pipeline."""

    def __init__(self, images: torch.Tensor, transform):
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3), as in the CIFAR pickles
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index]))


def lightly_worker(settings: Settings, conn) -> None:
    """The same run written the way lightly's examples write it: its transform, head and loss, a DataLoader."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    from sslbench.backbones import build_encoder

    torch.set_num_threads(settings.threads)
    images = training_images(settings).images
    report_at = knn_epochs(settings)
    torch.manual_seed(settings.seed)
    encoder = build_encoder(RESNET)  # the engine builds the encoder first after torch.manual_seed(seed), too
    head = SimCLRProjectionHead(128, 512, 128)
    criterion = NTXentLoss(temperature=0.5)
    # normalize=None: the shared encoder applies the same ImageNet mean/std itself (the Encoder contract takes
    # [0, 1] images), so normalising per image here too would normalise twice.
    transform = SimCLRTransform(input_size=int(images.shape[-1]), gaussian_blur=0.0, normalize=None)
    train = settings.recipe["train"]  # the protocol's SGD settings, the very ones sslbench's worker runs with
    loader = torch.utils.data.DataLoader(PilImages(images, transform), batch_size=train["batch_size"], shuffle=True,
                                         drop_last=True, num_workers=2, persistent_workers=True,
                                         generator=torch.Generator().manual_seed(settings.seed))
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"], weight_decay=train["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * len(loader))
    encoder.train()
    head.train()
    for epoch in range(1, settings.epochs + 1):
        conn.recv()
        start, seen, loss_sum = time.perf_counter(), 0, 0.0
        for view1, view2 in loader:
            z = head(encoder(torch.cat([view1, view2])).pooled)
            loss = criterion(*z.chunk(2))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(view1)
            loss_sum += loss.item() * len(view1)
        seconds = time.perf_counter() - start
        conn.send(EpochReport(seconds, seen, loss_sum / seen, numpy_state(encoder) if epoch in report_at else None))


WORKERS = {"sslbench": sslbench_worker, "lightly": lightly_worker}


# --- parent ------------------------------------------------------------------------------------------
def run_side_by_side(settings: Settings, evaluate, workers: dict[str, Any] = WORKERS) -> dict[str, LibraryRun]:
    """Start both ``workers`` (name -> ``worker(settings, conn)``), alternate their epochs (A B, B A, ...), and
    collect timings, memory and kNN; ``evaluate(name, encoder_state)`` scores an encoder a worker sent."""
    context = multiprocessing.get_context("spawn")  # no threads or torch state leak from the parent
    libraries = tuple(workers)
    runs = {name: LibraryRun() for name in libraries}
    pipes, processes = {}, {}
    for name in libraries:
        pipes[name], child = context.Pipe()
        processes[name] = context.Process(target=workers[name], args=(settings, child), name=f"{name}-worker")
        processes[name].start()
        child.close()  # so that a crashed worker ends the parent's recv() with EOFError instead of a hang
    try:
        for epoch in range(1, settings.epochs + 1):
            for name in libraries if epoch % 2 else libraries[::-1]:
                with PeakRss(processes[name].pid) as memory:
                    pipes[name].send("go")
                    report: EpochReport = pipes[name].recv()
                run = runs[name]
                run.peak_rss_mb = max(run.peak_rss_mb, memory.peak_mb)
                run.epoch_seconds.append(report.seconds)
                run.images += report.images
                run.losses.append(report.loss)
                print(f"epoch {epoch} {name}: {report.seconds:.1f} s, {report.images / report.seconds:.0f} images/s, "
                      f"loss {report.loss:.4f}, peak RSS {memory.peak_mb:.0f} MB", flush=True)
                if report.encoder_state is not None:
                    run.knn_top1[epoch] = evaluate(name, report.encoder_state)
                    print(f"  kNN top-1 {run.knn_top1[epoch]:.4f}", flush=True)
        for process in processes.values():
            process.join()
    finally:
        for process in processes.values():
            if process.is_alive():
                process.terminate()
    return runs


def markdown_report(runs: dict[str, LibraryRun], floors: dict[str, float], settings: Settings, command: str) -> str:
    import lightly
    import lightning

    import sslbench

    ours, theirs = runs["sslbench"], runs["lightly"]
    protocol = settings.epochs == 15 and settings.limit is None
    seed = [] if settings.seed == 0 else [f"- Seed {settings.seed} (the protocol's is 0) for both libraries; the floors stay at seed 0."]
    lines = [
        "# SimCLR speed: sslbench vs lightly (C10-mini, ../shared/BENCHMARKS.md)", "",
        *([] if protocol else [f"**Smoke run, not the protocol**: {settings.epochs} epoch(s), "
                               f"{settings.limit or 10_000} training images, {settings.limit or 10_000} test queries.", ""]),
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores visible, {settings.threads} torch threads per library.",
        f"- Versions: sslbench {sslbench.__version__}, lightly {lightly.__version__}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}, Python {platform.python_version()}.",
        f"- Date: {date.today()}. Command: `{command}`",
        *seed,
        "- Epochs alternate between the libraries (A B, B A, ...), each library in its own worker process;",
        "  peak memory is the resident memory summed over the worker's process tree (DataLoader workers included;",
        "  pages shared after fork count once per process), sampled every 0.25 s while that library trains.",
        "- sslbench: `sslbench.engine.pretrain` with `c10_mini.RECIPES['simclr']` (uint8 batches, batched augmentation,",
        "  no weight decay on biases and norms). lightly: `SimCLRTransform(gaussian_blur=0.0, normalize=None)` per PIL image",
        "  in a DataLoader with 2 persistent workers, `SimCLRProjectionHead(128, 512, 128)`, `NTXentLoss(0.5)`, SGD on all",
        "  parameters, `CosineAnnealingLR` per step. Both normalise with ImageNet mean/std inside the same encoder.",
        "",
        "| | sslbench | lightly | ratio (sslbench / lightly) |", "|---|---|---|---|",
        f"| source images/s | {ours.images_per_second:.0f} | {theirs.images_per_second:.0f} | "
        f"{ours.images_per_second / theirs.images_per_second:.2f}x |",
        f"| seconds per epoch (kNN excluded) | {ours.seconds_per_epoch:.1f} | {theirs.seconds_per_epoch:.1f} | "
        f"{ours.seconds_per_epoch / theirs.seconds_per_epoch:.2f} |",
        f"| peak RSS (process tree) | {ours.peak_rss_mb:.0f} MB | {theirs.peak_rss_mb:.0f} MB | "
        f"{ours.peak_rss_mb / theirs.peak_rss_mb:.2f} |",
        f"| final loss | {ours.losses[-1]:.4f} | {theirs.losses[-1]:.4f} | |",
    ]
    for epoch in sorted(ours.knn_top1):
        difference = 100 * (ours.knn_top1[epoch] - theirs.knn_top1[epoch])
        lines.append(f"| kNN top-1 after epoch {epoch} | {ours.knn_top1[epoch]:.2%} | {theirs.knn_top1[epoch]:.2%} | "
                     f"{difference:+.1f} points |")
    lines += ["", "Floors (same kNN): " + ", ".join(f"{name} {score:.2%}" for name, score in floors.items()) + ".",
              "", "Seconds per epoch, in order: "
              + "; ".join(f"{name} " + ", ".join(f"{s:.1f}" for s in runs[name].epoch_seconds) for name in LIBRARIES) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--report", required=True, type=Path, help="Markdown report to write.")
    parser.add_argument("--epochs", type=int, default=15, help="The protocol's 15; fewer only for a smoke run.")
    parser.add_argument("--limit", type=int, default=None, help="Smoke runs: use only N training images and N test queries.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/speed_vs_lightly"))
    parser.add_argument("--seed", type=int, default=0, help="Both libraries' seed (the protocol's is 0; others measure seed noise).")
    args = parser.parse_args()

    from sslbench.backbones import build_encoder
    from sslbench.data import load_dataset
    from sslbench.evaluation import random_subject
    from sslbench.tasks import ProbeConfig
    from sslbench.tasks.classification import ClassificationTask

    torch.set_num_threads(args.threads)
    settings = Settings(args.data_root, args.epochs, args.limit, args.threads, args.out, seed=args.seed)
    train = training_images(settings)
    test = load_dataset("cifar10", args.data_root, "test", limit=args.limit)
    probe = ProbeConfig(seed=0, device="cpu", knn_k=200, knn_temperature=0.1)

    def evaluate(library: str, state: dict[str, Any]) -> float:  # both libraries train the same RESNET
        encoder = build_encoder(RESNET)
        encoder.load_state_dict({name: torch.from_numpy(value) for name, value in state.items()})
        return ClassificationTask().evaluate(encoder, train, test, "knn", probe)["top1"]

    floors = {"raw pixels": raw_pixel_knn(train, test, probe),
              "random init": ClassificationTask().evaluate(random_subject(RESNET, "random", seed=0).encoder, train, test, "knn", probe)["top1"]}
    print(f"floors: {floors}", flush=True)
    runs = run_side_by_side(settings, evaluate)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(markdown_report(runs, floors, settings, command))
    print(args.report.read_text(), flush=True)


if __name__ == "__main__":
    main()
