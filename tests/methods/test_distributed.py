"""Under DDP (2 CPU processes, gloo) the losses and the queue equal one process on the concatenated batch."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sslbench.methods.detcon import detcon_loss
from sslbench.methods.moco import infonce_loss
from sslbench.methods.parts import Queue, sinkhorn
from sslbench.methods.simclr import ntxent_loss

WORLD = 2
BATCH = 3  # per process


def _data():
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(WORLD * BATCH, 8, generator=generator), torch.randn(WORLD * BATCH, 8, generator=generator)
    return z1, z2


def _detcon_data():
    """Mask vectors (B, K, D) of two views, K = 3 drawn segment ids per image and whether each view shows them."""
    generator = torch.Generator().manual_seed(2)
    v1, v2 = torch.randn(WORLD * BATCH, 3, 4, generator=generator), torch.randn(WORLD * BATCH, 3, 4, generator=generator)
    ids = torch.tensor([[0, 0, 2], [1, 3, 4], [0, 1, 1], [5, 6, 7], [2, 2, 2], [0, 1, 2]])  # equal ids in other images: other segments
    present = torch.rand(2, WORLD * BATCH, 3, generator=generator) > 0.2
    targets = torch.randn(2, WORLD * BATCH, 3, 4, generator=generator)  # DetCon_B's target projections
    return v1, v2, ids, present[0], present[1], targets


def _worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        z1, z2 = _data()
        local = slice(rank * BATCH, (rank + 1) * BATCH)
        a, b = z1[local].clone().requires_grad_(), z2[local].clone().requires_grad_()
        loss = ntxent_loss(a, b, 0.5)
        loss.backward()
        queue = Queue(size=8, dim=8)
        torch.manual_seed(1)
        queue.keys.copy_(torch.nn.functional.normalize(torch.randn(8, 8), dim=1))
        queue.enqueue(z1[local])
        queue.enqueue(z2[local])
        moco = infonce_loss(z1[local], z2[local], queue.keys, 0.2)
        codes = sinkhorn(z1[local], 0.5, 3)
        v1, v2, ids, present1, present2, targets = _detcon_data()
        m1, m2 = v1[local].clone().requires_grad_(), v2[local].clone().requires_grad_()
        detcon = detcon_loss(m1, m2, ids[local], present1[local], present2[local], 0.1)
        detcon.backward()
        p1 = v1[local].clone().requires_grad_()
        detcon_b = detcon_loss(p1, v2[local], ids[local], present1[local], present2[local], 0.1, targets=tuple(targets[:, local]))
        detcon_b.backward()
        torch.save({"loss": loss.detach(), "grad1": a.grad, "grad2": b.grad, "queue": queue.keys.clone(),
                    "pointer": queue.pointer.clone(), "moco": moco, "codes": codes, "detcon": detcon.detach(),
                    "detcon_grad1": m1.grad, "detcon_grad2": m2.grad, "detcon_b": detcon_b.detach(),
                    "detcon_b_grad1": p1.grad}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_losses_and_queue_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(WORLD)]

    z1, z2 = _data()
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    single = ntxent_loss(a, b, 0.5)
    single.backward()
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), single.detach(), atol=1e-6)
    # DDP averages gradients over processes; the autograd all_gather already sums every process's
    # contribution into the local slice, so grad / world is the single-process gradient.
    assert torch.allclose(torch.cat([r["grad1"] for r in ranks]) / WORLD, a.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["grad2"] for r in ranks]) / WORLD, b.grad, atol=1e-6)

    queue = Queue(size=8, dim=8)
    torch.manual_seed(1)
    queue.keys.copy_(torch.nn.functional.normalize(torch.randn(8, 8), dim=1))
    queue.enqueue(z1)
    queue.enqueue(z2)
    for r in ranks:
        assert torch.equal(r["queue"], queue.keys) and int(r["pointer"]) == int(queue.pointer)
    moco = infonce_loss(z1, z2, queue.keys, 0.2)
    assert torch.allclose(torch.stack([r["moco"] for r in ranks]).mean(), moco, atol=1e-6)
    assert torch.allclose(torch.cat([r["codes"] for r in ranks]), sinkhorn(z1, 0.5, 3), atol=1e-6)

    v1, v2, ids, present1, present2, targets = _detcon_data()
    m1, m2 = v1.clone().requires_grad_(), v2.clone().requires_grad_()
    detcon = detcon_loss(m1, m2, ids, present1, present2, 0.1)
    detcon.backward()
    assert torch.allclose(torch.stack([r["detcon"] for r in ranks]).mean(), detcon.detach(), atol=1e-6)
    assert torch.allclose(torch.cat([r["detcon_grad1"] for r in ranks]) / WORLD, m1.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["detcon_grad2"] for r in ranks]) / WORLD, m2.grad, atol=1e-6)
    # DetCon_B: the target projections are keys from every process, with no gradient; DDP averages the
    # predictions' gradients, so each process's local gradient is WORLD times the single-process one.
    p1 = v1.clone().requires_grad_()
    detcon_b = detcon_loss(p1, v2, ids, present1, present2, 0.1, targets=tuple(targets))
    detcon_b.backward()
    assert torch.allclose(torch.stack([r["detcon_b"] for r in ranks]).mean(), detcon_b.detach(), atol=1e-6)
    assert torch.allclose(torch.cat([r["detcon_b_grad1"] for r in ranks]) / WORLD, p1.grad, atol=1e-6)
