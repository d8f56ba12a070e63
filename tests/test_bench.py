"""``sslbench bench``: config validation, a tiny matrix, resuming (skipped cells, interrupted pretraining), the table."""

import copy
import json
from pathlib import Path

import pytest
import yaml

import sslbench.bench as bench
import sslbench.engine as engine
from sslbench.bench import done_cells, load_bench_config, parse_bench_config, run_bench
from sslbench.engine import export_encoder
from sslbench.errors import ConfigError
from sslbench.results import load_rows, matrix_table, print_table

SCENES = {"name": "scenes", "image_size": 16, "train_limit": 32, "test_limit": 16}


def tiny_config(out) -> dict:
    """Two random encoders x (classification/knn, counting/linear) x two seeds on 32 + 16 tiny scenes."""
    return {
        "out": str(out),
        "device": "cpu",
        "seeds": [0, 1],
        "probe": {"epochs": 1, "batch_size": 16},
        "datasets": {"classification": dict(SCENES), "counting": dict(SCENES)},
        "tasks": {"classification": ["knn"], "counting": ["linear"]},
        "encoders": [
            {"random": {"backbone": "resnet18", "width": 0.125, "stem": "cifar"}, "name": "rand-a"},
            {"random": "resnet18", "width": 0.0625},
        ],
    }


def with_change(config: dict, path: str, value) -> dict:
    """A copy of ``config`` with the dotted ``path`` set to ``value`` (``None`` deletes the key)."""
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is None:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return config


@pytest.mark.parametrize("path,value,message", [
    ("outt", "x", "unknown key 'outt'; allowed: out, device"),
    ("out", None, "needs out:"),
    ("device", "tpu", "device='tpu' is not allowed; use one of auto, cpu, cuda"),
    ("seeds", [0, 0], "seeds=[0, 0] must be a non-empty list of distinct integers"),
    ("probe.epochs", 0, "ProbeConfig.epochs must be a positive integer"),
    ("probe.epoch", 1, "unknown option 'epoch' in probe; allowed:"),
    ("probe.seed", 1, "probe.seed is set by the top-level seeds: key"),
    ("tasks.depthh", ["probe"], "tasks.depthh is not a task; use one of"),
    ("tasks.classification", ["knnn"], "task classification has no protocol 'knnn'; use one of knn"),
    ("tasks.classification", "knn", "tasks.classification must be a list of protocols"),
    ("datasets.counting", None, "datasets has no entry for task counting"),
    ("datasets.counting.imagesize", 16, "unknown option 'imagesize' in datasets.counting; allowed:"),
    ("datasets.counting.train_limit", "many", "train_limit='many' is not a valid int"),
    ("datasets.counting.name", "cifar10", "dataset cifar10 has no labels for task counting"),
    ("datasets.classification.name", "cifar10", "datasets.classification (dataset cifar10) needs root:"),
    ("datasets.classification.root", "/no/such/folder", "root '/no/such/folder' does not exist; set it to the folder"),
    ("encoders", [], "encoders must be a non-empty list"),
    ("encoders.0.timm", "resnet10t", "encoders[0] must have exactly one of checkpoint, random, timm, pretrain; it has random, timm"),
    ("encoders.0.widht", 1, "encoders[0] has unknown key 'widht'; allowed with random: image_size, name, random, width"),
    ("encoders.0.random", "resnet19", "unknown backbone 'resnet19'"),
    ("encoders.0.random", {"backbone": "igpt"}, "encoders[0].random: an iGPT reads colour-palette tokens"),
    ("encoders.1.name", "rand-a", "encoders[0] and encoders[1] are both named 'rand-a'"),
    ("encoders.1", {"timm": "resnet10x?pretrained=false"}, "unknown timm model 'resnet10x'; did you mean resnet10t"),
    ("encoders.1", {"checkpoint": "/no/such/run"}, "checkpoint '/no/such/run' not found"),
    ("encoders.1", {"pretrain": {"method": "simclr", "data": SCENES}}, "unknown option 'train_limit' in encoders[1].pretrain.data"),
    ("encoders.1", {"pretrain": {"method": "simclrr", "data": {"name": "scenes"}}}, "method 'simclrr' is unknown"),
    ("encoders.1", {"pretrain": {"method": "simclr", "data": {"name": "scenes"}, "epoch": 1}},
     "encoders[1].pretrain has unknown key 'epoch' for method simclr; allowed:"),
    ("encoders.1", {"pretrain": {"method": "simclr", "data": {"name": "scenes"}, "lr": -1}},
     "encoders[1].pretrain: option lr=-1.0 is out of range"),
    ("encoders.1", {"pretrain": {"method": "simclr", "data": {"name": "scenes"}, "temperature": "hot"}},
     "temperature='hot' is not a valid float"),
])
def test_config_errors_name_the_key_and_the_fix(tmp_path, path, value, message):
    config = with_change(tiny_config(tmp_path / "out"), path, value)
    with pytest.raises(ConfigError) as error:
        parse_bench_config(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_tiny_matrix_writes_its_rows_then_skips_every_cell(tmp_path, monkeypatch):
    config_file = tmp_path / "bench.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tmp_path / "out")))
    config = load_bench_config(config_file)
    header, body = run_bench(config)

    rows = load_rows(tmp_path / "out")
    cells = {(r["method"], r["task"], r["protocol"], r["seed"]) for r in rows}
    assert cells == {(m, t, p, s) for m in ("rand-a", "random-resnet18") for t, p in (("classification", "knn"), ("counting", "linear"))
                     for s in (0, 1)}
    headline = {(r["method"], r["task"], r["seed"]): r for r in rows if r["metric"] in ("top1", "accuracy")}
    assert len(headline) == 8
    assert all(r["dataset"] == "scenes" and r["train_size"] == 32 and r["test_size"] == 16 and r["checkpoint"] == "random"
               for r in rows)
    assert header == ["method", "scenes class/knn top1 ↑", "scenes count/linear accuracy ↑"]
    assert [line[0] for line in body] == ["rand-a", "random-resnet18"] and all("±" in cell for line in body for cell in line[1:])

    # A second run finds every cell done: it loads no data, builds no encoder, appends nothing.
    def forbidden(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    for name in ("evaluate", "load_splits", "make_subject"):
        monkeypatch.setattr(bench, name, forbidden)
    lines = (tmp_path / "out" / "results.jsonl").read_text()
    assert run_bench(load_bench_config(config_file)) == (header, body)
    assert (tmp_path / "out" / "results.jsonl").read_text() == lines


def test_a_killed_run_resumes_with_the_missing_cells_only(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "out")
    config["encoders"] = config["encoders"][:1]
    config["tasks"] = {"classification": ["knn"]}
    run_bench(parse_bench_config(config))
    results = tmp_path / "out" / "results.jsonl"
    kept = [line for line in results.read_text().splitlines() if json.loads(line)["seed"] == 0]
    results.write_text("".join(line + "\n" for line in kept))  # as if killed before seed 1 finished

    ran = []
    real_evaluate = bench.evaluate
    monkeypatch.setattr(bench, "evaluate", lambda subject, task, protocol, *args, **kwargs: ran.append(
        (subject.method, task, protocol, args[3].seed)) or real_evaluate(subject, task, protocol, *args, **kwargs))
    run_bench(parse_bench_config(config))
    assert ran == [("rand-a", "classification", "knn", 1)]
    # A changed probe budget is another setup: its cells are not done, and the old rows stay out of its table.
    assert done_cells(parse_bench_config(with_change(config, "probe.epochs", 2))) == set()
    assert len(done_cells(parse_bench_config(config))) == 2


def test_checkpoint_and_timm_encoders_are_labelled_and_skipped_when_done(tmp_path):
    from sslbench.backbones import backbone_spec, build_encoder

    export_encoder(build_encoder(backbone_spec("resnet18", 0.0625, 16)), tmp_path / "runs" / "mine", {"method": "simclr", "epochs": 3})
    config = tiny_config(tmp_path / "out")
    config["seeds"] = [0]
    config["tasks"] = {"classification": ["knn"]}
    config["encoders"] = [{"checkpoint": f"{tmp_path}/runs/mine/"}, {"timm": "resnet10t?pretrained=false"}]
    run_bench(parse_bench_config(config))
    rows = load_rows(tmp_path / "out")
    assert {(r["method"], r["checkpoint"], r["epochs"]) for r in rows} == {
        ("mine", str(tmp_path / "runs" / "mine"), 3), ("random-timm:resnet10t", "random", 0)}
    assert done_cells(parse_bench_config(config)) == {bench.Cell("mine", "classification", "knn", 0),
                                                      bench.Cell("random-timm:resnet10t", "classification", "knn", 0)}


def test_pretrain_encoder_is_trained_once_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "out")
    config["seeds"] = [0]
    config["tasks"] = {"classification": ["knn"]}
    config["encoders"] = [{"pretrain": {"method": "simclr", "backbone": "resnet18", "width": 0.0625, "epochs": 2,
                                        "batch_size": 16, "data": {"name": "scenes", "image_size": 16, "limit": 16}}}]
    folder = tmp_path / "out" / "encoders" / "simclr"
    real_pretrain = engine.pretrain
    calls = []

    class Interrupt(Exception):
        pass

    class StopAtSecondEpoch(engine.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise Interrupt

    def interrupted(*args, **kwargs):
        return real_pretrain(*args, callbacks=[StopAtSecondEpoch()], **kwargs)

    monkeypatch.setattr(engine, "pretrain", interrupted)
    with pytest.raises(Interrupt):
        run_bench(parse_bench_config(config))
    assert json.loads((folder / "encoder.json").read_text())["epochs"] == 1 and not (tmp_path / "out" / "results.jsonl").exists()

    def recorded(method, images, run, **kwargs):
        result = real_pretrain(method, images, run, **kwargs)
        calls.append((run.resume, len(result.epoch_seconds)))
        return result

    monkeypatch.setattr(engine, "pretrain", recorded)
    run_bench(parse_bench_config(config))
    assert calls == [(True, 1)]  # continued from last.ckpt, trained only the missing epoch
    rows = load_rows(tmp_path / "out")
    assert {(r["method"], r["checkpoint"], r["epochs"]) for r in rows} == {("simclr", str(folder), 2)}

    run_bench(parse_bench_config(config))
    assert calls == [(True, 1)]  # finished encoder and finished cells: nothing trained again
    changed = with_change(config, "encoders.0.pretrain.lr", 0.01)
    changed["seeds"] = [5]
    with pytest.raises(ConfigError, match="holds an encoder pretrained with another recipe"):
        run_bench(parse_bench_config(changed))


def test_shipped_configs_are_valid(tmp_path):
    configs = Path(__file__).parents[1] / "configs"
    cpu = load_bench_config(configs / "core_study_cpu.yaml")
    assert [e.name for e in cpu.encoders] == ["simclr", "moco", "swav", "ddae", "random-resnet18", "random-unet-small"]
    assert len(cpu.cells()) == 6 * 5 * 3 and {d.name for d in cpu.datasets.values()} == {"scenes"}
    # The GPU config's roots are placeholders: validation names them; with real folders it passes.
    with pytest.raises(ConfigError, match="root '/set/to/your/folder/.*' does not exist; set it to the folder"):
        load_bench_config(configs / "core_study.yaml")
    data = yaml.safe_load((configs / "core_study.yaml").read_text())
    for entry in [*data["datasets"].values(), *(e["pretrain"]["data"] for e in data["encoders"] if "pretrain" in e)]:
        entry["root"] = str(tmp_path)
    full = parse_bench_config(data)
    assert set(full.tasks) == {"classification", "counting", "depth", "segmentation"} and full.seeds == [0, 1, 2]
    assert {e.name for e in full.encoders} >= {"ddae", "simclr", "moco", "swav", "timm:resnet50"}


def test_table_is_mean_and_sample_std_over_seeds():
    def row(method, task, protocol, metric, value, seed, dataset="scenes"):
        return {"method": method, "checkpoint": "c", "dataset": dataset, "task": task, "protocol": protocol,
                "metric": metric, "value": value, "seed": seed}

    rows = [
        row("a", "classification", "linear", "top1", 0.9, 0),  # replaced by the newer row of seed 0 below
        row("a", "classification", "linear", "top1", 0.5, 0),
        row("a", "classification", "linear", "top1", 0.7, 1),
        row("a", "depth", "probe", "rmse", 1.0, 0),
        row("a", "depth", "probe", "rmse", 2.0, 1),
        row("a", "depth", "probe", "rmse", 4.0, 2),
        row("a", "depth", "probe", "abs_rel", 9.0, 0),
        row("b", "depth", "probe", "rmse", 1.5, 0),
        row("b", "depth", "probe", "rmse", 7.0, 1, dataset="nyu"),
    ]
    header, body = matrix_table(rows, ["b", "a"], [("classification", "linear", "scenes"), ("depth", "probe", "scenes")])
    assert header == ["method", "scenes class/linear top1 ↑", "scenes depth/probe rmse ↓"]
    # a: top1 (0.5, 0.7): mean 0.6, std sqrt(0.02) = 0.1414; rmse (1, 2, 4): mean 7/3, std sqrt(7/3) = 1.5275.
    assert body == [["b", "-", "1.500"], ["a", "0.600 ± 0.141", "2.333 ± 1.528"]]


def test_printed_table_keeps_bracketed_labels(capsys):
    # rich reads "[...]" as markup; the method labels of DetCon and a chosen DDAE readout must survive.
    print_table(["method", "scenes class/knn top1 ↑"], [["detcon_s[fh]", "0.500"], ["ddae[t=11,up1.1]", "0.400"]],
                title="runs/[x]")
    out = capsys.readouterr().out
    assert "detcon_s[fh]" in out and "ddae[t=11,up1.1]" in out and "runs/[x]" in out
