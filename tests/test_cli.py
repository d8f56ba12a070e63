"""The CLI: every bad input is one line naming the problem and the fix, exit code 2, nothing written."""

import json

import pytest
from PIL import Image



@pytest.mark.parametrize("args,message", [
    (["pretrain", "--method", "simclrr"], "unknown method 'simclrr'; use one of"),
    (["pretrain", "--method", "simclr", "--data", "imagenet"], "unknown dataset 'imagenet'"),
    (["pretrain", "--method", "simclr", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["pretrain", "--method", "simclr", "--epochs", "0"], "--epochs=0 is out of range"),
    (["pretrain", "--method", "simclr", "--width", "-1"], "--width=-1.0 is out of range"),
    (["pretrain", "--method", "simclr", "--set", "temperature"], "is not KEY=VALUE"),
    (["pretrain", "--method", "simclr", "--set", "temprature=0.1", "--limit", "64"], "unknown option 'temprature'"),
    (["pretrain", "--method", "simclr", "--set", "lr=fast", "--limit", "64"], "lr='fast' is not a valid float"),
    (["pretrain", "--method", "simclr", "--set", "final_lr_scale=2", "--limit", "64"], "final_lr_scale=2.0 is out of range"),
    (["pretrain", "--method", "simclr", "--set", "legacy=1", "--limit", "64"], "unknown option 'legacy'"),  # a ClassVar, not a setting
    (["pretrain", "--method", "simclr", "--data", "cifar10"], "needs --data-root"),
    (["pretrain", "--method", "simclr", "--data", "cifar10", "--stream", "--image-size", "32"],
     "--stream reads a folder of image files and works with --data folder only; drop --stream to load cifar10 in memory"),
    (["pretrain", "--method", "simclr", "--data", "folder", "--data-root", "x", "--stream"],
     "--stream needs --image-size: every streamed image is decoded and resized to that square size"),
    (["pretrain", "--method", "simclr", "--loader-workers", "2"], "--loader-workers applies to --stream only"),
    (["pretrain", "--method", "simclr", "--data", "folder", "--data-root", "x", "--stream", "--image-size", "16",
      "--loader-workers", "-1"], "--loader-workers=-1 is out of range"),
    (["eval", "--task", "depthh", "--random"], "unknown task 'depthh'"),
    (["eval", "--task", "depth", "--protocol", "knn", "--random"], "task depth has no protocol 'knn'"),
    (["eval", "--task", "depth", "--data", "cifar10", "--random"], "dataset cifar10 has no labels for task depth"),
    (["eval", "--task", "classification"], "give exactly one of --encoder (timm:NAME, random:BACKBONE or PATH), --checkpoint PATH or --random"),
    (["eval", "--task", "classification", "--random", "--encoder", "timm:resnet10t"], "give exactly one of --encoder"),
    (["eval", "--task", "classification", "--encoder", "timm:resnet10x?pretrained=false"], "unknown timm model 'resnet10x'; did you mean"),
])
def test_bad_input_is_one_line_exit_2(run_cli, monkeypatch, capsys, tmp_path, args, message):
    out = tmp_path / "out"
    code, _, err = run_cli(*args, "--out", out)
    assert code == 2
    assert message in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()


def test_missing_and_wrongly_laid_out_data_roots(run_cli, monkeypatch, capsys, tmp_path):
    code, _, err = run_cli("pretrain", "--method", "simclr", "--data", "cifar10",
                           "--data-root", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert code == 2 and "nowhere" in err and "not found" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("pretrain", "--method", "simclr", "--data", "cifar10",
                           "--data-root", tmp_path / "empty", "--out", tmp_path / "o")
    assert code == 2 and "cifar-10-batches-py" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_corrupt_image_is_named(run_cli, monkeypatch, capsys, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"not a png at all")
    code, _, err = run_cli("pretrain", "--method", "simclr", "--data", "folder",
                           "--data-root", folder, "--out", tmp_path / "o")
    assert code == 2 and "bad.png" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_pretrain_streams_a_folder(run_cli, monkeypatch, capsys, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (20 + i, 18), (20 * i, 10, 200 - 10 * i)).save(folder / f"{i}.png")  # sizes differ
    out = tmp_path / "run"
    code, stdout, _ = run_cli("pretrain", "--method", "simclr", "--data", "folder", "--data-root", folder, "--stream",
                              "--loader-workers", "1", "--image-size", "16", "--backbone", "resnet18", "--width", "0.125", "--epochs", "1",
                              "--batch-size", "4", "--set", "projection_hidden=32", "--set", "projection_dim=16", "--out", out)
    assert code == 0 and "simclr: 1 epochs this run" in stdout
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["image_size"] == 16 and meta["train_images"] == 10 and meta["train"]["batch_size"] == 4


def test_eval_random_appends_rows_and_results_prints_the_table(run_cli, monkeypatch, capsys, tmp_path):
    out = tmp_path / "eval"
    code, stdout, _ = run_cli("eval", "--random", "--backbone", "resnet18", "--width", "0.125",
                              "--task", "classification", "--protocol", "knn", "--train-limit", "200",
                              "--test-limit", "50", "--out", out)
    assert code == 0 and "top1=" in stdout
    rows = (out / "results.jsonl").read_text().splitlines()
    assert len(rows) == 1 and '"method": "random-resnet18"' in rows[0] and '"task": "classification"' in rows[0]
    code, stdout, _ = run_cli("results", out)
    assert code == 0 and "random-resnet18" in stdout and "class/knn top1" in stdout


def test_bench_config_errors_are_one_line(run_cli, monkeypatch, capsys, tmp_path):
    code, _, err = run_cli("bench", tmp_path / "missing.yaml")
    assert code == 2 and "missing.yaml not found" in err and err.count("\n") == 1
    config = tmp_path / "bench.yaml"
    config.write_text("out: runs/x\nseed: [0]\n")
    code, _, err = run_cli("bench", config)
    assert code == 2 and "bench config has unknown key 'seed'; allowed: out, device, seeds" in err and err.count("\n") == 1


def test_eval_encoder_timm_labels_its_rows(run_cli, monkeypatch, capsys, tmp_path):
    code, stdout, _ = run_cli("eval", "--encoder", "timm:resnet10t?pretrained=false", "--task", "classification",
                              "--protocol", "knn", "--train-limit", "40", "--test-limit", "10", "--image-size", "16", "--out", tmp_path)
    assert code == 0 and "random-timm:resnet10t classification/knn" in stdout
    assert '"checkpoint": "random"' in (tmp_path / "results.jsonl").read_text()


def test_help_documents_every_option(run_cli, monkeypatch, capsys):
    code, stdout, _ = run_cli("pretrain", "--help")
    assert code == 0
    for option in ("--method", "--data", "--data-root", "--backbone", "--width", "--epochs", "--batch-size",
                   "--limit", "--out", "--seed", "--resume", "--set"):
        assert option in stdout
