"""``sslbench bench CONFIG.yaml``: the core study as one command, a matrix of encoders x tasks x protocols x seeds.

A config names the output folder, one dataset per task, the encoders (exported checkpoints, random
inits, timm models, or methods to pretrain first), the protocols of every task, the seeds and the probe
budget; ``configs/core_study_cpu.yaml`` is a complete example. The whole file is checked at start-up,
so a typo fails before any work with the key's place in the file and what is allowed there.

Every cell (encoder, task, protocol, seed) goes through ``evaluation.evaluate`` and appends its rows to
``out/results.jsonl``. Rows carry a ``bench_setup`` fingerprint of the cell's dataset and probe budget;
a cell whose rows are already there with the same fingerprint is skipped, so a killed run resumes where
it stopped and an edited budget is re-run rather than mixed with old numbers. ``pretrain`` encoders are
trained once into ``out/encoders/NAME``, continuing from their ``last.ckpt`` after an interruption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from sslbench.config import apply_overrides, load_yaml
from sslbench.data import dataset_entry, load_dataset
from sslbench.errors import ConfigError
from sslbench.evaluation import EncoderUnderTest, check_encoder_reference, check_task, evaluate, load_splits
from sslbench.tasks import TASKS, ProbeConfig, default_device

ENCODER_KINDS = ("checkpoint", "random", "timm", "pretrain")
TOP_LEVEL_KEYS = ("out", "device", "seeds", "probe", "datasets", "tasks", "encoders")
PRETRAIN_KEYS = ("method", "data", "backbone", "width")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DatasetConfig:
    """The dataset of one task: registry name, folder (``root``, not needed for scenes), size and limits."""

    name: str = "scenes"
    root: str | None = None
    image_size: int | None = None
    train_limit: int | None = None
    test_limit: int | None = None


@dataclass
class ImagesConfig:
    """The unlabelled images a ``pretrain`` encoder trains on: the training split of ``name``."""

    name: str = "scenes"
    root: str | None = None
    image_size: int | None = None
    limit: int | None = None


@dataclass
class PretrainConfig:
    """A method to pretrain before evaluation, as ``sslbench pretrain`` would run it."""

    method: str = ""
    data: ImagesConfig = field(default_factory=ImagesConfig)
    backbone: str | None = None
    width: float = 1.0
    train: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def recipe(self) -> dict[str, Any]:
        """Everything that decides the pretrained weights, as JSON; stored with them to detect a changed config."""
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))


@dataclass
class EncoderConfig:
    """One row of the table. ``source``: the checkpoint path, the timm reference, or the random backbone
    (a name as ``--backbone`` takes it, or a spec dict); ``pretrain`` for pretrained-here encoders."""

    name: str = ""
    kind: str = ""
    source: Any = None
    width: float = 1.0
    image_size: int = 32
    pretrain: PretrainConfig | None = None


@dataclass(frozen=True)
class Cell:
    """One evaluation; its result rows carry the same (method = encoder name, task, protocol, seed)."""

    encoder: str
    task: str
    protocol: str
    seed: int


@dataclass
class BenchConfig:
    """A validated bench config (see the module docstring)."""

    out: Path
    seeds: list[int]
    device: str
    probe: dict[str, Any]
    datasets: dict[str, DatasetConfig]
    tasks: dict[str, list[str]]
    encoders: list[EncoderConfig]

    def cells(self) -> list[Cell]:
        """Every cell, in table order: encoders, then tasks and protocols as configured, then seeds."""
        return [Cell(encoder.name, task, protocol, seed) for encoder in self.encoders
                for task, protocols in self.tasks.items() for protocol in protocols for seed in self.seeds]

    def probe_config(self, seed: int, device: str) -> ProbeConfig:
        return ProbeConfig(**self.probe, seed=seed, device=device)

    def setup(self, task: str) -> str:
        """Fingerprint of what a task's numbers depend on besides encoder and seed: its dataset and the probe budget."""
        text = json.dumps({"dataset": dataclasses.asdict(self.datasets[task]), "probe": self.probe}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"bench config {where} must be a mapping of key: value, got {value!r}")
    return value


def _typed(cls: type, value: Any, where: str) -> Any:
    """``cls`` (a dataclass with defaults) with the keys of mapping ``value`` applied and type-checked."""
    return apply_overrides(cls(), _mapping(value, where), f" in {where}")


def _dataset(value: Any, task: str, protocols: list[str]) -> DatasetConfig:
    where = f"datasets.{task}"
    dataset = _typed(DatasetConfig, value, where)
    for protocol in protocols:
        check_task(task, protocol, dataset.name)
    _check_images(dataset.name, dataset.root, dataset.image_size, where)
    for key in ("train_limit", "test_limit"):
        if getattr(dataset, key) is not None and getattr(dataset, key) < 1:
            raise ConfigError(f"bench config {where}.{key}={getattr(dataset, key)} is out of range; use a positive number of images")
    return dataset


def _check_images(name: str, root: str | None, image_size: int | None, where: str) -> None:
    entry = dataset_entry(name)
    if entry.needs_root and root is None:
        raise ConfigError(f"bench config {where} (dataset {name}) needs root: the folder holding {entry.layout}")
    if root is not None and not Path(root).exists():
        raise ConfigError(f"bench config {where}.root {root!r} does not exist; set it to the folder holding {entry.layout}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"bench config {where}.image_size={image_size} is out of range; use a positive size in pixels")


def _pretrain(value: Any, where: str) -> PretrainConfig:
    """Split a ``pretrain:`` mapping like ``sslbench pretrain`` does: training keys, method options, the rest."""
    from sslbench.methods import METHODS, TrainConfig

    value = dict(_mapping(value, where))
    if "method" not in value or "data" not in value:
        raise ConfigError(f"bench config {where} needs method: (one of {', '.join(sorted(METHODS))}) and data: (the images to pretrain on)")
    method = value.pop("method")
    if method not in METHODS:
        raise ConfigError(f"bench config {where}.method {method!r} is unknown; use one of {', '.join(sorted(METHODS))}")
    data = _typed(ImagesConfig, value.pop("data"), f"{where}.data")
    _check_images(data.name, data.root, data.image_size, f"{where}.data")
    config = _typed(PretrainConfig, {k: value.pop(k) for k in ("backbone", "width") if k in value}, where)
    config.method, config.data = method, data
    cls = METHODS[method]
    train_keys = TrainConfig.keys()
    option_keys = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(value) - train_keys - option_keys)
    if unknown:
        allowed = ", ".join(sorted({*PRETRAIN_KEYS, *train_keys, *option_keys}))
        raise ConfigError(f"bench config {where} has unknown key {unknown[0]!r} for method {method}; allowed: {allowed}")
    config.train = {k: v for k, v in value.items() if k in train_keys}
    config.options = {k: v for k, v in value.items() if k not in train_keys}
    train = apply_overrides(TrainConfig(), config.train, f" in {where}")
    try:
        train.validate()
    except ConfigError as error:
        raise ConfigError(f"bench config {where}: {error}") from None
    apply_overrides(cls.Options(), config.options, f" in {where}")
    if config.backbone is not None:
        from sslbench.backbones import backbone_spec

        backbone_spec(config.backbone, config.width, data.image_size or 32)  # raises on an unknown backbone name
    return config


def _encoder(value: Any, index: int) -> EncoderConfig:
    where = f"encoders[{index}]"
    value = _mapping(value, where)
    kinds = [kind for kind in ENCODER_KINDS if kind in value]
    if len(kinds) != 1:
        raise ConfigError(f"bench config {where} must have exactly one of {', '.join(ENCODER_KINDS)}; it has {', '.join(kinds) or 'none'}")
    kind = kinds[0]
    allowed = {kind, "name", *(("width", "image_size") if kind == "random" else ())}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"bench config {where} has unknown key {unknown[0]!r}; allowed with {kind}: {', '.join(sorted(allowed))}")
    source = value[kind]
    entry = EncoderConfig(name="", kind=kind, source=source)
    if kind == "checkpoint":
        if not Path(str(source)).exists():
            raise ConfigError(f"bench config {where}.checkpoint {source!r} not found; give the output folder of 'sslbench pretrain'")
        entry.source, default_name = str(Path(str(source))), Path(str(source)).name  # "runs/a/" and "runs/a" alike
    elif kind == "timm":
        from sslbench.backbones.timm_encoder import TIMM_PREFIX, parse_timm_reference, timm_label

        entry.source = str(source) if str(source).startswith(TIMM_PREFIX) else f"{TIMM_PREFIX}{source}"
        check_encoder_reference(entry.source)
        spec = parse_timm_reference(entry.source)
        default_name = timm_label(spec) if spec["pretrained"] else f"random-{timm_label(spec)}"
    elif kind == "random":
        sizes = _typed(EncoderConfig, {k: value[k] for k in ("width", "image_size") if k in value}, where)
        entry.width, entry.image_size = sizes.width, sizes.image_size
        from sslbench.backbones import BACKBONES, backbone_spec

        if isinstance(source, str):
            backbone_spec(source, entry.width, entry.image_size)  # raises on an unknown backbone name
            default_name = f"random-{source}"
        elif isinstance(source, dict) and source.get("backbone") == "igpt":
            raise ConfigError(f"bench config {where}.random: an iGPT reads colour-palette tokens, and a palette exists only once "
                              "it is fitted on training pixels; use checkpoint: with an igpt run's folder (it keeps its palette)")
        elif isinstance(source, dict) and source.get("backbone") in BACKBONES:
            default_name = f"random-{source['backbone']}"
        else:
            raise ConfigError(f"bench config {where}.random must be a backbone name (e.g. resnet18) or a spec with "
                              f"backbone: one of {', '.join(sorted(BACKBONES))}; got {source!r}")
    else:
        entry.pretrain = _pretrain(source, f"{where}.pretrain")
        default_name = entry.pretrain.method
    entry.name = str(value.get("name", default_name))
    return entry


def parse_bench_config(data: dict[str, Any]) -> BenchConfig:
    """Validate a bench config mapping; every error names the key's place and the allowed values."""
    data = _mapping(data, "file")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"bench config has unknown key {unknown[0]!r}; allowed: {', '.join(TOP_LEVEL_KEYS)}")
    for key in ("out", "datasets", "tasks", "encoders"):
        if key not in data:
            raise ConfigError(f"bench config needs {key}: (see configs/core_study_cpu.yaml for a complete example)")
    device = data.get("device", "auto")
    if device not in DEVICES:
        raise ConfigError(f"bench config device={device!r} is not allowed; use one of {', '.join(DEVICES)}")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"bench config seeds={seeds!r} must be a non-empty list of distinct integers, e.g. [0, 1, 2]")
    probe = dict(_mapping(data.get("probe", {}), "probe"))
    for key in ("seed", "device"):
        if key in probe:
            raise ConfigError(f"bench config probe.{key} is set by the top-level {key}{'s' if key == 'seed' else ''}: key; move it there")
    probe = {k: getattr(_typed(ProbeConfig, probe, "probe"), k) for k in probe}
    tasks: dict[str, list[str]] = {}
    for task, protocols in _mapping(data["tasks"], "tasks").items():
        if task not in TASKS:
            raise ConfigError(f"bench config tasks.{task} is not a task; use one of {', '.join(TASKS)}")
        if not isinstance(protocols, list) or not protocols or not all(isinstance(p, str) for p in protocols):
            raise ConfigError(f"bench config tasks.{task} must be a list of protocols, e.g. [{', '.join(TASKS[task].protocols)}]")
        tasks[task] = protocols
    if not tasks:
        raise ConfigError(f"bench config tasks is empty; name at least one of {', '.join(TASKS)} with its protocols")
    dataset_values = _mapping(data["datasets"], "datasets")
    for task in dataset_values:
        if task not in TASKS:
            raise ConfigError(f"bench config datasets.{task} is not a task; key datasets by task: {', '.join(TASKS)}")
    datasets = {}
    for task, protocols in tasks.items():
        if task not in dataset_values:
            raise ConfigError(f"bench config datasets has no entry for task {task}; add datasets.{task}: {{name: ..., root: ...}}")
        datasets[task] = _dataset(dataset_values[task], task, protocols)
    values = data["encoders"]
    if not isinstance(values, list) or not values:
        raise ConfigError("bench config encoders must be a non-empty list of entries with checkpoint:, random:, timm: or pretrain:")
    encoders = [_encoder(value, index) for index, value in enumerate(values)]
    names = [encoder.name for encoder in encoders]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(f"bench config encoders[{names.index(name)}] and encoders[{index}] are both named {name!r}; "
                              "give one of them a distinct name:")
    return BenchConfig(Path(data["out"]), seeds, device, probe, datasets, tasks, encoders)


def load_bench_config(path: Path) -> BenchConfig:
    """Read and validate a bench YAML file."""
    return parse_bench_config(load_yaml(path))


def bench_rows(config: BenchConfig) -> list[dict[str, Any]]:
    """The rows of ``out/results.jsonl`` that belong to this config: one of its encoders (same name and
    weights), one of its tasks, and the task's current setup fingerprint."""
    from sslbench.results import load_rows, results_path

    if not results_path(config.out).is_file():
        return []
    checkpoints = {encoder.name: _checkpoint_label(config, encoder) for encoder in config.encoders}
    return [row for row in load_rows(config.out)
            if row.get("task") in config.tasks and row.get("bench_setup") == config.setup(row["task"])
            and checkpoints.get(row.get("method")) == row.get("checkpoint")]


def done_cells(config: BenchConfig) -> set[Cell]:
    """The cells whose rows are already in ``out/results.jsonl`` (see ``bench_rows``)."""
    return {Cell(row["method"], row["task"], row["protocol"], row["seed"]) for row in bench_rows(config)}


def _checkpoint_label(config: BenchConfig, encoder: EncoderConfig) -> str:
    """What the ``checkpoint`` field of this encoder's rows says (which weights were evaluated)."""
    if encoder.kind == "checkpoint":
        return encoder.source
    if encoder.kind == "pretrain":
        return str(pretrain_folder(config, encoder))
    if encoder.kind == "timm":
        from sslbench.backbones.timm_encoder import parse_timm_reference, timm_label

        spec = parse_timm_reference(encoder.source)
        return timm_label(spec) if spec["pretrained"] else "random"
    return "random"


def pretrain_folder(config: BenchConfig, encoder: EncoderConfig) -> Path:
    return config.out / "encoders" / encoder.name


def ensure_pretrained(config: BenchConfig, encoder: EncoderConfig, accelerator: str, console: Console) -> Path:
    """Pretrain ``encoder`` into ``out/encoders/NAME`` unless it is there already; continue an interrupted run."""
    from sslbench.engine import ENCODER_SPEC, LAST_CHECKPOINT, RunConfig, pretrain
    from sslbench.methods import METHODS

    recipe = encoder.pretrain
    folder = pretrain_folder(config, encoder)
    meta_file = folder / ENCODER_SPEC
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("bench_recipe") != recipe.recipe():
            raise ConfigError(f"{folder} holds an encoder pretrained with another recipe than encoder {encoder.name!r} now has; "
                              "delete that folder or give the encoder another name:")
        if meta["epochs"] >= meta["train"]["epochs"]:
            return folder
    resume = (folder / LAST_CHECKPOINT).is_file()
    data = recipe.data
    images = load_dataset(data.name, data.root, dataset_entry(data.name).train_split, data.image_size, data.limit)
    console.print(f"pretraining [bold]{encoder.name}[/bold] ({recipe.method}) on {len(images)} {data.name} images"
                  f"{' (resuming)' if resume else ''} into {folder}")
    backbone = None
    if recipe.backbone is not None:
        from sslbench.backbones import backbone_spec

        backbone = backbone_spec(recipe.backbone, recipe.width, images.image_size[0])
    masks = images.targets.get("mask") if METHODS[recipe.method].needs_masks else None
    result = pretrain(recipe.method, images.images, RunConfig(out=folder, accelerator=accelerator, resume=resume),
                      backbone=backbone, options=recipe.options, train=recipe.train, masks=masks,
                      info={"data": data.name, "train_images": len(images), "bench_recipe": recipe.recipe()})
    console.print(f"  {encoder.name}: {sum(result.epoch_seconds):.0f} s, final loss {result.final_loss:.4f}")
    return folder


def make_subject(config: BenchConfig, encoder: EncoderConfig, seed: int) -> EncoderUnderTest:
    """A fresh encoder for one cell (so no protocol can change the weights another cell sees), labelled with its name."""
    from sslbench.backbones import backbone_spec
    from sslbench.evaluation import checkpoint_subject, encoder_subject, random_subject

    if encoder.kind == "random":
        spec = encoder.source if isinstance(encoder.source, dict) else backbone_spec(encoder.source, encoder.width, encoder.image_size)
        subject = random_subject(spec, encoder.name, seed)
    elif encoder.kind == "timm":
        subject = encoder_subject(encoder.source, seed, encoder.image_size)
    else:
        path = Path(encoder.source) if encoder.kind == "checkpoint" else pretrain_folder(config, encoder)
        subject = checkpoint_subject(path)
    subject.method = encoder.name
    return subject


def run_bench(config: BenchConfig, console: Console | None = None) -> tuple[list[str], list[list[str]]]:
    """Run every cell not yet in ``out/results.jsonl``, then print and return the table (header, body)."""
    from sslbench.results import matrix_table, print_table, results_path

    console = console or Console()
    start = time.perf_counter()
    cells = config.cells()
    done = done_cells(config)
    pending = [cell for cell in cells if cell not in done]
    console.print(f"[bold]sslbench bench[/bold]: {len(cells)} cells, {len(cells) - len(pending)} already in "
                  f"{results_path(config.out)}, {len(pending)} to run")
    if pending:
        _run_cells(config, pending, console)
    columns = [(task, protocol, config.datasets[task].name) for task, protocols in config.tasks.items() for protocol in protocols]
    header, body = matrix_table(bench_rows(config), [encoder.name for encoder in config.encoders], columns)
    print_table(header, body, title=f"sslbench bench ({time.perf_counter() - start:.0f} s, mean ± std over seeds "
                                    f"{', '.join(map(str, config.seeds))}) - {results_path(config.out)}")
    return header, body


def _run_cells(config: BenchConfig, pending: list[Cell], console: Console) -> None:
    device = default_device(None if config.device == "auto" else config.device)
    accelerator = "auto" if config.device == "auto" else ("gpu" if device == "cuda" else "cpu")
    encoders = {encoder.name: encoder for encoder in config.encoders}
    needed = list(dict.fromkeys(cell.encoder for cell in pending))
    for name in needed:
        if encoders[name].kind == "pretrain":
            ensure_pretrained(config, encoders[name], accelerator, console)
    for name in needed:  # build each once now: a missing weight file fails here, not hours into the run
        make_subject(config, encoders[name], config.seeds[0])
    # Cells sharing a dataset run together, so each dataset is loaded once and only one is held at a time.
    by_dataset: dict[str, list[Cell]] = {}
    for cell in pending:
        by_dataset.setdefault(json.dumps(dataclasses.asdict(config.datasets[cell.task]), sort_keys=True), []).append(cell)
    number = 0
    for group in by_dataset.values():
        dataset = config.datasets[group[0].task]
        train, test = load_splits(dataset.name, dataset.root, dataset.image_size, dataset.train_limit, dataset.test_limit)
        for cell in group:
            number += 1
            subject = make_subject(config, encoders[cell.encoder], cell.seed)
            probe = config.probe_config(cell.seed, device)
            metrics = evaluate(subject, cell.task, cell.protocol, dataset.name, train, test, probe, config.out,
                               extra={"bench_setup": config.setup(cell.task)})
            console.print(f"[{number}/{len(pending)}] {cell.encoder} {cell.task}/{cell.protocol} seed {cell.seed}: "
                          + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
