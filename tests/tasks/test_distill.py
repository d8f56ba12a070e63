"""Distillation (SimCLRv2's third stage): the soft-label loss, a student that learns its teacher's answers,
and the ``distill-*`` protocols that fine-tune a teacher on few labels and distil it on all images."""

import math

import pytest
import torch
import torch.nn.functional as F

from sslbench.data.base import ImageSet
from sslbench.tasks import TASKS, ProbeConfig
from sslbench.tasks import classification
from sslbench.tasks.distill import distill, distillation_loss
from sslbench.tasks.finetune import crop_flip_augment, finetune
from sslbench.tasks.heads import linear_task_head
from sslbench.tasks.probe import predict

CONFIG = ProbeConfig(epochs=6, batch_size=16, lr=3e-2)  # enough steps for a confident teacher (softmax max ~0.9)


def _hand_distillation_loss(student, teacher, tau):
    """Plain-float -mean_x sum_y softmax(t / tau)_y * log softmax(s / tau)_y."""
    total = 0.0
    for s, t in zip(student, teacher):
        weights = [math.exp(v / tau) for v in t]
        target = [w / sum(weights) for w in weights]
        log_normaliser = math.log(sum(math.exp(v / tau) for v in s))
        total -= sum(p * (v / tau - log_normaliser) for p, v in zip(target, s))
    return total / len(student)


def test_distillation_loss_matches_hand_computation():
    student = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]
    teacher = [[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]]
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), 2.0)
    assert got.item() == pytest.approx(_hand_distillation_loss(student, teacher, 2.0), abs=1e-6)
    assert got.item() == pytest.approx(1.2343, abs=1e-4)  # the loop above, once, pins the formula itself
    # At tau = 1 it is the cross-entropy to the teacher's softmax; hard one-hot teachers give plain CE.
    one_hot = torch.tensor([[50.0, 0.0, 0.0], [0.0, 0.0, 50.0]])
    assert distillation_loss(torch.tensor(student), one_hot, 1.0).item() == pytest.approx(
        F.cross_entropy(torch.tensor(student), torch.tensor([0, 2])).item(), abs=1e-6)


def test_distillation_loss_is_smallest_at_the_teacher_and_sends_no_gradient_to_it():
    teacher = torch.tensor([[1.0, -1.0, 0.5]], requires_grad=True)
    entropy = -(F.softmax(teacher, 1) * F.log_softmax(teacher, 1)).sum().item()
    assert distillation_loss(teacher * 1.0, teacher, 1.0).item() == pytest.approx(entropy, abs=1e-6)
    student = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    loss = distillation_loss(student, teacher, 1.0)
    assert loss.item() > entropy
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def _agreement(student_head, student, teacher_head, teacher, images):
    student_labels = torch.cat([out.argmax(1) for _, out in predict(student_head, student, images, CONFIG)])
    teacher_labels = torch.cat([out.argmax(1) for _, out in predict(teacher_head, teacher, images, CONFIG)])
    return (student_labels == teacher_labels).float().mean().item()


def test_student_learns_to_agree_with_its_teacher(data):
    encoder, train, test = data
    torch.manual_seed(0)
    teacher_head = linear_task_head(encoder.pooled_dim, 3)
    teacher = finetune(teacher_head, encoder, train, train.targets["class"], F.cross_entropy, crop_flip_augment, CONFIG)
    student_head = linear_task_head(encoder.pooled_dim, 3)
    before = _agreement(student_head, encoder, teacher_head, teacher, test)
    unlabelled = ImageSet(name="unlabelled", images=train.images)  # no targets at all
    student = distill(student_head, encoder, teacher_head, teacher, unlabelled, crop_flip_augment, CONFIG, temperature=2.0)
    after = _agreement(student_head, student, teacher_head, teacher, test)
    assert student is not encoder and student is not teacher
    assert after > 0.9 and after > before + 0.3


def test_distill_protocol_teaches_on_few_labels_and_distils_on_all_images(data, monkeypatch):
    encoder, train, test = data
    seen = []
    real_distill = classification.distill

    def spy(student_head, student, teacher_head, teacher, unlabelled, *args):
        seen.append(unlabelled)
        return real_distill(student_head, student, teacher_head, teacher, unlabelled, *args)

    monkeypatch.setattr(classification, "distill", spy)
    result = TASKS["classification"]().evaluate(encoder, train, test, "distill-10pct", CONFIG)
    (unlabelled,) = seen
    assert torch.equal(unlabelled.images, train.images) and unlabelled.targets == {}  # every image, no label
    assert set(result) == {"top1", "teacher_top1", "trainable_params"}
    assert result["top1"] > 0.5 and result["teacher_top1"] > 0.5  # chance: 1/3
    # The student: every encoder parameter (a fine-tuned copy) plus a linear head on 24 features, 3 classes.
    assert result["trainable_params"] == encoder.num_parameters + 24 * 3 + 3
