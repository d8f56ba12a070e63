"""DetCon_S / DetCon_B: mask pooling, both losses against loop-by-loop hand computations, mask-id sampling,
the FH mask cache, training through the engine, resume, and the errors of a wrong mask source."""

import json
import math

import pytest
import skimage.segmentation
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from safetensors.torch import load_file

from sslbench.data import IGNORE_INDEX, load_dataset
from sslbench.engine import RunConfig, load_encoder, pretrain
from sslbench.errors import ConfigError, DataError
from sslbench.evaluation import checkpoint_subject
from sslbench.methods import TrainConfig, detcon
from sslbench.methods.detcon import (DetConBOptions, DetConSOptions, detcon_b_regression_loss, detcon_loss, felzenszwalb_masks, sample_mask_ids)
from sslbench.methods.parts import masked_pool

RESNET = {"backbone": "resnet18", "width": 0.125, "stem": "cifar"}
SMALL_HEADS = {"projection_hidden": 64, "projection_dim": 32}


def test_masked_pool_matches_hand_computation():
    feature_map = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])  # (1, 2, 2, 2)
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 0, :2, :2] = 1  # the whole top-left cell ...
    masks[0, 0, 0, 2] = 1  # ... and one of the four pixels of the top-right cell
    masks[0, 1, 2:, :] = 1  # the bottom row of cells
    pooled = masked_pool(feature_map, masks)  # masks[0, 2] is empty
    # Cell weights: top-left 1, top-right 1/4 -> (1 * f00 + 0.25 * f01) / 1.25.
    expected = torch.tensor([[[(1 + 0.25 * 2) / 1.25, (10 + 0.25 * 20) / 1.25], [3.5, 35.0], [0.0, 0.0]]])
    assert pooled.shape == (1, 3, 2)
    assert torch.allclose(pooled, expected)
    # At the map's own resolution a binary mask gives the plain mean of its cells.
    same_size = masked_pool(feature_map, torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]]))
    assert torch.allclose(same_size, torch.tensor([[[2.5, 25.0]]]))


def _unit(vector):
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


def _hand_detcon_s(z1, z2, ids, present1, present2, tau, t1=None, t2=None):
    """Loop-by-loop contrastive detection loss over every (view, image, sample) query, in Python floats.
    The keys are ``t1``, ``t2`` where given (DetCon_B's target projections), else the queries."""
    views = [z1.tolist(), z2.tolist()]
    keys = [t1.tolist(), t2.tolist()] if t1 is not None else views
    present = [present1.tolist(), present2.tolist()]
    ids = ids.tolist()
    batch, num = len(ids), len(ids[0])
    entries = [(v, b, k) for v in range(2) for b in range(batch) for k in range(num)]
    total = 0.0
    for v, b, k in entries:
        if not present[v][b][k]:
            continue
        query = _unit(views[v][b][k])
        scores, positives = [], []
        for v2, b2, k2 in entries:
            same_segment = b2 == b and ids[b2][k2] == ids[b][k]
            if not present[v2][b2][k2] or (same_segment and v2 == v):
                continue
            score = sum(x * y for x, y in zip(query, _unit(keys[v2][b2][k2]))) / tau
            scores.append(score)
            if same_segment:
                positives.append(score)
        if not positives:
            continue
        log_total = math.log(sum(math.exp(s) for s in scores))
        draws = sum(1 for other in ids[b] if other == ids[b][k])
        total += sum(log_total - s for s in positives) / len(positives) / draws
    return total / (2 * batch * num)


def _tiny_masks_case():
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)
    ids = torch.tensor([[0, 0, 2], [1, 3, 4]])  # image 0 drew segment 0 twice
    present1 = torch.tensor([[True, True, True], [True, False, True]])  # segment 3 left view 1
    present2 = torch.tensor([[True, True, False], [True, True, True]])  # segment 2 left view 2
    return z1, z2, ids, present1, present2


def test_detcon_s_loss_matches_hand_computation():
    z1, z2, ids, present1, present2 = _tiny_masks_case()
    got = detcon_loss(z1, z2, ids, present1, present2, 0.1)
    assert abs(got.item() - _hand_detcon_s(z1, z2, ids, present1, present2, 0.1)) < 1e-5
    # A concrete value, computed once by the loops above, pins the formula itself.
    assert abs(got.item() - 4.2318) < 1e-3


def test_detcon_s_positives_are_the_same_segment_in_the_other_view():
    # Image b, sample k has its own direction; the other view shows the same segments.
    z = torch.eye(6).view(2, 3, 6)
    ids = torch.tensor([[4, 7, 9], [4, 7, 9]])  # equal ids in two images are different segments
    present = torch.ones(2, 3, dtype=torch.bool)
    aligned = detcon_loss(z, z * 2.0, ids, present, present, 0.1)
    # The same vectors, but view 2's segments swapped within each image: the positive is now another mask.
    swapped = detcon_loss(z, z[:, [1, 0, 2]], ids, present, present, 0.1)
    # Or swapped across images: segment 4 of image 0 now meets segment 4 of image 1.
    across = detcon_loss(z, z[[1, 0]], ids, present, present, 0.1)
    assert aligned.item() < 1e-3
    assert swapped.item() > 5 and across.item() > 5


def test_detcon_s_ignores_segments_missing_from_a_view():
    z1, z2, ids, present1, present2 = _tiny_masks_case()
    z1.requires_grad_(True)
    detcon_loss(z1, z2, ids, present1, present2, 0.1).backward()
    # Segment 3 (image 1, sample 1) is missing from view 1: its view-1 vector is neither query nor key.
    assert z1.grad[1, 1].abs().max() == 0
    assert z1.grad[0, 2].abs().max() > 0  # segment 2 is a key (a negative) even though its query has no positive


def _hand_detcon_b(p1, p2, t1, t2, valid):
    total = 0.0
    batch, num = valid.shape
    for b in range(batch):
        for k in range(num):
            if not valid[b, k]:
                continue
            for p, t in ((p1[b, k].tolist(), t2[b, k].tolist()), (p2[b, k].tolist(), t1[b, k].tolist())):
                cosine = sum(x * y for x, y in zip(_unit(p), _unit(t)))
                total += (2 - 2 * cosine) / 2
    return total / (batch * num)


def test_detcon_b_contrastive_loss_uses_predictions_as_queries_and_targets_as_keys():
    p1, p2, ids, present1, present2 = _tiny_masks_case()
    generator = torch.Generator().manual_seed(5)
    t1, t2 = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)
    p1.requires_grad_(True)
    got = detcon_loss(p1, p2, ids, present1, present2, 0.1, targets=(t1, t2))
    assert abs(got.item() - _hand_detcon_s(p1, p2, ids, present1, present2, 0.1, t1, t2)) < 1e-5
    # Different from the loss with the predictions as their own keys (DetCon_S's form).
    assert abs(got.item() - detcon_loss(p1, p2, ids, present1, present2, 0.1).item()) > 0.1
    got.backward()
    assert p1.grad[1, 1].abs().max() == 0  # segment 3 is missing from view 1: no query there
    # Predictions aligned with their targets, distinct across segments, cost almost nothing.
    z = torch.eye(6).view(2, 3, 6)
    unique = torch.tensor([[4, 7, 9], [4, 7, 9]])
    present = torch.ones(2, 3, dtype=torch.bool)
    assert detcon_loss(z, z, unique, present, present, 0.1, targets=(3 * z, 3 * z)).item() < 1e-3


@pytest.mark.parametrize("objective,called", [("contrastive", "detcon_loss"), ("regression", "detcon_b_regression_loss")])
def test_detcon_b_objective_selects_its_loss(monkeypatch, small_scenes, objective, called):
    calls = []
    for name in ("detcon_loss", "detcon_b_regression_loss"):
        monkeypatch.setattr(detcon, name, lambda *args, name=name, **kwargs: calls.append(name) or torch.zeros(()))
    options = DetConBOptions(objective=objective, projection_hidden=32, prediction_hidden=32, projection_dim=16)
    method = detcon.DetConB(RESNET, options, TrainConfig(epochs=1), image_size=16, steps_per_epoch=1)
    masks = torch.zeros(4, 16, 16, dtype=torch.uint8)
    masks[:, :, 8:] = 1
    method.masked_training_loss(small_scenes[:4], masks, torch.Generator().manual_seed(0))
    assert calls == [called]


def test_detcon_b_objective_must_be_known():
    with pytest.raises(ConfigError, match="objective='nce' is not allowed; use one of contrastive, regression"):
        DetConBOptions(objective="nce")
    with pytest.raises(ConfigError, match="temperature=0"):
        DetConBOptions(temperature=0)


def test_detcon_b_regression_loss_matches_hand_computation_and_skips_missing_segments():
    generator = torch.Generator().manual_seed(1)
    p1, p2, t1, t2 = (torch.randn(2, 3, 5, generator=generator) for _ in range(4))
    valid = torch.tensor([[True, False, True], [True, True, False]])
    p1.requires_grad_(True)
    got = detcon_b_regression_loss(p1, p2, t1, t2, valid)
    assert abs(got.item() - _hand_detcon_b(p1, p2, t1, t2, valid)) < 1e-6
    got.backward()
    assert p1.grad[0, 1].abs().max() == 0 and p1.grad[1, 2].abs().max() == 0
    assert p1.grad[0, 0].abs().max() > 0
    # Predictions equal to their targets cost nothing.
    assert detcon_b_regression_loss(t2, t1, t1, t2, torch.ones(2, 3, dtype=torch.bool)).item() < 1e-6


def test_mask_ids_prefer_segments_in_both_views():
    masks1 = torch.full((3, 4, 4), IGNORE_INDEX, dtype=torch.uint8)
    masks2 = masks1.clone()
    masks1[0, :2], masks1[0, 2], masks1[0, 3] = 0, 1, 2  # image 0: view 1 shows 0, 1, 2; view 2 shows 1, 2, 3
    masks2[0, :2], masks2[0, 2], masks2[0, 3] = 3, 1, 2
    masks1[1] = 4  # image 1: the views share nothing
    masks2[1] = 5
    ids, present1, present2 = sample_mask_ids(masks1, masks2, 64, torch.Generator().manual_seed(0))
    assert set(ids[0].tolist()) == {1, 2} and present1[0].all() and present2[0].all()
    assert set(ids[1].tolist()) == {4, 5}
    assert torch.equal(present1[1], ids[1] == 4) and torch.equal(present2[1], ids[1] == 5)
    # Image 2 is all ignore: nothing to draw, every sample absent from both views.
    assert not present1[2].any() and not present2[2].any()
    again = sample_mask_ids(masks1, masks2, 64, torch.Generator().manual_seed(0))[0]
    assert torch.equal(ids, again)


def test_fh_masks_are_cached_on_disk_and_in_memory(tmp_path, monkeypatch):
    images = torch.zeros(3, 3, 16, 16, dtype=torch.uint8)
    images[:, :, :, 8:] = 255  # black left half, white right half (sigma 0: no smoothing blurs the edge)
    images[1, :, :8, :] = 120
    calls = []
    segment = skimage.segmentation.felzenszwalb

    def counting(*args, **kwargs):
        calls.append(1)
        return segment(*args, **kwargs)

    monkeypatch.setattr(skimage.segmentation, "felzenszwalb", counting)
    detcon._FH_MEMORY.clear()
    first = felzenszwalb_masks(images, 100.0, 0.0, 10, tmp_path)
    assert len(calls) == 3 and first.shape == (3, 16, 16) and first.dtype == torch.uint8
    # Two flat halves are two segments that follow the edge.
    assert torch.equal(first[0, :, :8] == first[0, 0, 0], torch.ones(16, 8, dtype=torch.bool))
    assert (first[0, :, 8:] != first[0, 0, 0]).all()
    assert int(first[1].max()) + 1 == 3  # image 1 has a grey quarter too
    cached = list(tmp_path.glob("fh-masks-*.npy"))
    assert len(cached) == 1
    detcon._FH_MEMORY.clear()  # a new process: only the disk cache is left
    second = felzenszwalb_masks(images, 100.0, 0.0, 10, tmp_path)
    assert len(calls) == 3 and torch.equal(first, second)
    cached[0].unlink()  # the in-memory copy answers without the file, and writes it back
    assert torch.equal(felzenszwalb_masks(images, 100.0, 0.0, 10, tmp_path), first) and len(calls) == 3
    assert cached[0].is_file()
    felzenszwalb_masks(images, 100.0, 0.0, 12, tmp_path)  # other parameters: computed anew
    assert len(calls) == 6


@pytest.mark.parametrize("method,options,epochs,drop,label", [
    ("detcon_s", SMALL_HEADS, 3, 0.1, "detcon_s[fh]"),
    # Against a slowly moving target the contrastive loss falls more slowly: 12 steps.
    ("detcon_b", {**SMALL_HEADS, "prediction_hidden": 64}, 6, 0.2, "detcon_b[fh,contrastive]"),
    ("detcon_b", {**SMALL_HEADS, "prediction_hidden": 64, "objective": "regression"}, 3, 0.2, "detcon_b[fh,regression]"),
])
def test_training_lowers_the_loss(tmp_path, small_scenes, method, options, epochs, drop, label):
    # 32 scenes at 16 px, batch 16: 2 steps an epoch.
    result = pretrain(method, small_scenes[:32], RunConfig(out=tmp_path / method, progress=False), backbone=RESNET,
                      options=options, train={"epochs": epochs, "batch_size": 16})
    assert result.epoch_losses[-1] < result.epoch_losses[0] - drop
    encoder, meta = load_encoder(tmp_path / method)
    assert encoder(torch.rand(2, 3, 16, 16)).pooled.shape == (2, 64)
    assert meta["method"] == method and meta["mask_source"] == "fh" and meta["label"] == label
    assert len(list(tmp_path.glob("fh-masks-*.npy"))) == 1  # the FH masks sit next to the run


class _Interrupt(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_resume_reproduces_an_uninterrupted_run(tmp_path, small_scenes):
    images = small_scenes[:32]

    def run(name, resume=False, callbacks=None):
        pretrain("detcon_s", images, RunConfig(out=tmp_path / name, progress=False, resume=resume), backbone=RESNET,
                 options=SMALL_HEADS, train={"epochs": 2, "batch_size": 16}, callbacks=callbacks)

    run("straight")
    run("split", callbacks=[_Interrupt()])
    detcon._FH_MEMORY.clear()  # the resumed run reloads its masks from the disk cache
    run("split", resume=True)
    straight = load_file(str(tmp_path / "straight" / "encoder.safetensors"))
    split = load_file(str(tmp_path / "split" / "encoder.safetensors"))
    for key in straight:
        assert torch.allclose(straight[key], split[key], atol=1e-6), key


def test_a_detcon_b_run_from_before_the_objective_option_resumes_only_as_the_regression_it_trained(tmp_path, small_scenes):
    # Checkpoints written before ``objective`` existed lack it and trained BYOL's per-mask regression; resuming one
    # with the contrastive default would switch its loss halfway.
    def run(resume=False, callbacks=None, **options):
        pretrain("detcon_b", small_scenes[:32], RunConfig(out=tmp_path / "run", progress=False, resume=resume),
                 backbone=RESNET, options={**SMALL_HEADS, **options}, train={"epochs": 2, "batch_size": 16},
                 callbacks=callbacks)

    run(callbacks=[_Interrupt()], objective="regression")
    last = tmp_path / "run" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    del checkpoint["hyper_parameters"]["options"]["objective"]
    torch.save(checkpoint, last)
    with pytest.raises(ConfigError, match="trained with options.objective='regression' and this command gives 'contrastive'"):
        run(resume=True)
    run(resume=True, objective="regression")
    assert json.loads((tmp_path / "run" / "encoder.json").read_text())["objective"] == "regression"


def test_bad_mask_options_and_masks_for_other_methods_fail_with_the_fix(tmp_path, small_scenes):
    with pytest.raises(ConfigError, match="mask_source='sam' is not allowed; use one of fh, ground_truth"):
        pretrain("detcon_s", small_scenes, RunConfig(out=tmp_path / "a", progress=False), options={"mask_source": "sam"})
    with pytest.raises(ConfigError, match="num_masks=0 is out of range"):
        DetConSOptions(num_masks=0)
    with pytest.raises(ConfigError, match="fh_scale=0.0 is out of range"):
        DetConSOptions(fh_scale=0.0)
    masks = torch.zeros(small_scenes.shape[0], *small_scenes.shape[2:], dtype=torch.uint8)
    with pytest.raises(ConfigError, match="method simclr does not use masks.*detcon_b, detcon_s"):
        pretrain("simclr", small_scenes, RunConfig(out=tmp_path / "b", progress=False), masks=masks)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ground_truth_without_masks_raises_the_documented_error(tmp_path, small_scenes):
    with pytest.raises(DataError, match="mask_source=ground_truth needs a dataset with a 'mask' target .*use --set mask_source=fh"):
        pretrain("detcon_s", small_scenes, RunConfig(out=tmp_path / "a", progress=False), backbone=RESNET,
                 options={"mask_source": "ground_truth"}, train={"batch_size": 16})
    assert not (tmp_path / "a").exists()


def test_cli_ground_truth_masks_on_scenes_and_on_a_dataset_without_masks(run_cli, tmp_path):
    tiny = ["--backbone", "resnet18", "--width", "0.125", "--image-size", "16", "--limit", "32", "--epochs", "1",
            "--batch-size", "16", "--set", "mask_source=ground_truth", "--set", "projection_hidden=64"]
    code, _, err = run_cli("pretrain", "--method", "detcon_s", *tiny, "--out", tmp_path / "scenes")
    assert code == 0, err
    meta = json.loads((tmp_path / "scenes" / "encoder.json").read_text())
    assert meta["mask_source"] == "ground_truth" and meta["options"]["mask_source"] == "ground_truth"
    assert checkpoint_subject(tmp_path / "scenes").method == "detcon_s[ground_truth]"
    assert not list(tmp_path.glob("fh-masks-*.npy"))  # ground truth needs no FH masks

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(16):
        Image.new("RGB", (16, 16), (index * 10, 20, 30)).save(folder / f"{index}.png")
    code, _, err = run_cli("pretrain", "--method", "detcon_s", "--data", "folder", "--data-root", folder,
                     *tiny, "--out", tmp_path / "folder")
    assert code == 2 and err.count("\n") == 1
    assert "mask_source=ground_truth needs a dataset with a 'mask' target (scenes, pets)" in err
    assert not (tmp_path / "folder").exists()


def test_ground_truth_masks_follow_the_scenes_objects():
    scenes = load_dataset("scenes", None, "train", limit=4)
    masks = detcon.DetConS.dataset_masks(DetConSOptions(mask_source="ground_truth"), scenes.images, scenes.targets["mask"], None)
    assert masks.dtype == torch.uint8 and torch.equal(masks.long(), scenes.targets["mask"])
    with pytest.raises(DataError, match="integer ids in \\[0, 255\\]"):
        detcon.DetConS.dataset_masks(DetConSOptions(mask_source="ground_truth"), scenes.images, scenes.targets["mask"] + 300, None)
