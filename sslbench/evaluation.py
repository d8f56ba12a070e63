"""Evaluate any encoder on a task: load the dataset's two splits, run the task, append result rows."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sslbench.backbones import Encoder, backbone_spec, build_encoder
from sslbench.data import ImageSet, dataset_entry, load_dataset
from sslbench.engine import load_encoder
from sslbench.errors import ConfigError
from sslbench.results import append_rows
from sslbench.tasks import TASKS, TRAINABLE_PARAMS, ProbeConfig


@dataclass
class EncoderUnderTest:
    """An encoder plus the labels its result rows carry."""

    encoder: Encoder
    method: str
    checkpoint: str
    epochs: int


def random_subject(spec: dict[str, Any], label: str, seed: int) -> EncoderUnderTest:
    """The encoder of ``spec`` at random initialisation (seeded): the floor every method must clear."""
    torch.manual_seed(seed)
    return EncoderUnderTest(build_encoder(spec, pretrained=False).eval(), label, "random", 0)


def checkpoint_subject(path: Path) -> EncoderUnderTest:
    """An exported encoder, labelled with the method (or the finer ``label`` its method recorded, such as
    ``detcon_s[fh]`` with DetCon's mask source) and the epochs recorded next to its weights."""
    encoder, meta = load_encoder(path)
    label = meta.get("label", meta.get("method", "unknown"))
    return EncoderUnderTest(encoder, label, str(path), int(meta.get("epochs", 0)))


def encoder_subject(reference: str, seed: int, image_size: int, width: float = 1.0) -> EncoderUnderTest:
    """The encoder named by ``reference``, the general form of ``sslbench eval --encoder``.

    ``timm:NAME[?KEY=VALUE&...]``: a timm model with its published weights, labelled ``timm:NAME``
    (with ``pretrained=false``: random init, labelled like every random baseline, ``random-timm:NAME``);
    ``random:BACKBONE``: a backbone as ``--backbone`` names it (``width``, ``image_size`` as there) at
    random init seeded with ``seed``; anything else: the folder of an exported checkpoint.
    """
    from sslbench.backbones.timm_encoder import TIMM_PREFIX, parse_timm_reference, timm_label

    if reference.startswith(TIMM_PREFIX):
        spec = parse_timm_reference(reference)
        if not spec["pretrained"]:
            return random_subject(spec, f"random-{timm_label(spec)}", seed)
        return EncoderUnderTest(build_encoder(spec).eval(), timm_label(spec), timm_label(spec), 0)
    if reference.startswith("random:"):
        name = reference.removeprefix("random:")
        return random_subject(backbone_spec(name, width, image_size), f"random-{name}", seed)
    return checkpoint_subject(Path(reference))


def check_encoder_reference(reference: str) -> None:
    """Fail before any data is loaded when ``encoder_subject`` cannot resolve ``reference`` (an unknown
    timm model or backbone name); checkpoint folders are checked when they are loaded."""
    from sslbench.backbones.timm_encoder import TIMM_PREFIX, check_timm_name, parse_timm_reference

    if reference.startswith(TIMM_PREFIX):
        check_timm_name(parse_timm_reference(reference)["name"])
    elif reference.startswith("random:"):
        backbone_spec(reference.removeprefix("random:"))


def check_task(task: str, protocol: str | None, dataset: str) -> str:
    """Validate (task, protocol, dataset) before any work; return the protocol (default: the task's first)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    protocols = TASKS[task].protocols
    protocol = protocol or protocols[0]
    if protocol not in protocols:
        raise ConfigError(f"task {task} has no protocol {protocol!r}; use one of {', '.join(protocols)}")
    entry = dataset_entry(dataset)
    if task not in entry.tasks:
        raise ConfigError(f"dataset {dataset} has no labels for task {task}; it supports {', '.join(entry.tasks)}")
    return protocol


def load_splits(dataset: str, root: str | Path | None, image_size: int | None, train_limit: int | None,
                test_limit: int | None) -> tuple[ImageSet, ImageSet]:
    entry = dataset_entry(dataset)
    train = load_dataset(dataset, root, entry.train_split, image_size=image_size, limit=train_limit)
    test = load_dataset(dataset, root, entry.test_split, image_size=image_size, limit=test_limit)
    return train, test


def evaluate(subject: EncoderUnderTest, task: str, protocol: str, dataset: str, train: ImageSet, test: ImageSet,
             probe: ProbeConfig, out: Path | None, extra: dict[str, Any] | None = None) -> dict[str, float]:
    """Run one (task, protocol) on the encoder and append one row per metric to ``out``'s results.

    The protocol's ``trainable_params`` is a field of every row rather than a row of its own: it
    describes the evaluation, so seeds and tables of the metrics are not mixed with it.
    """
    start = time.perf_counter()
    metrics = TASKS[task]().evaluate(subject.encoder, train, test, protocol, probe)
    seconds = time.perf_counter() - start
    if out is not None:
        append_rows(out, [{
            "method": subject.method, "checkpoint": subject.checkpoint, "dataset": dataset, "task": task,
            "protocol": protocol, "metric": name, "value": float(value), "seed": probe.seed,
            "epochs": subject.epochs, "seconds": round(seconds, 3), "train_size": len(train), "test_size": len(test),
            TRAINABLE_PARAMS: int(metrics[TRAINABLE_PARAMS]), **(extra or {}),
        } for name, value in metrics.items() if name != TRAINABLE_PARAMS])
    return metrics
