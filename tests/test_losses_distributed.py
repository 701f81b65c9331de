"""Two gloo processes agree with one process that holds the concatenated batch.

The two are global ranks 0 and 2 of a world of 3 (rank 1 stands for a generator), as trainers
are when every node has generators: their group ranks are not their global ranks.

What is compared, per rank r of a world of W = 2 holding rows r * N_local ... of the batch:
- losses: each rank's loss is the mean over its own rows, so the mean of the ranks' losses
  equals the single-process loss;
- feature gradients: rank r backpropagates only its own loss, and the all-gather's backward
  sums every rank's gradient for its rows, so rank r's gradient equals W times the slice of the
  single-process gradient (DDP then divides parameter gradients by W: the same update);
- SyncBatchNorm1d: outputs, running statistics and input gradients of a summed objective equal
  one BatchNorm per view chunk over the rows of both ranks.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from online_stablerep.losses import image_text_contrastive_loss, multi_positive_contrastive_loss
from online_stablerep.models.sync_batchnorm import SyncBatchNorm1d
from tests.helpers import free_port

WORLD = 2
# Global ranks of the two trainers in a world of three processes.
TRAINERS = [0, 2]
N_CAPTIONS_LOCAL, K, DIM, TAU = 3, 3, 8, 0.1
TIMEOUT_S = 90


def global_inputs() -> dict[str, torch.Tensor]:
    """The whole batch, identical on every process (seeded), rank-major like a gather."""
    g = torch.Generator().manual_seed(0)
    # Caption 42 appears on both ranks: its rows must be positives across ranks too.
    captions = [[42, 1, 2], [3, 42, 4]]
    ids = torch.cat([torch.tensor(c * K) for c in captions])  # (W * k * n,)
    return {
        "features": torch.randn(len(ids), DIM, generator=g),
        "ids": ids,
        "texts": torch.randn(WORLD * N_CAPTIONS_LOCAL, DIM, generator=g),
        "text_ids": torch.tensor(sum(captions, [])),
        "bn_input": torch.randn(WORLD * K * 4, 6, generator=g) * 3 + 1,
        "bn_weights": torch.randn(WORLD * K * 4, 6, generator=g),
    }


def losses_and_grads(features, ids, texts, text_ids, group=None):
    features = features.clone().requires_grad_(True)
    texts = texts.clone().requires_grad_(True)
    loss_img = multi_positive_contrastive_loss(features, ids, TAU, group)
    (grad_img,) = torch.autograd.grad(loss_img, features)
    loss_it = image_text_contrastive_loss(features, ids, texts, text_ids, torch.tensor(2.0), group)
    grad_it_img, grad_it_text = torch.autograd.grad(loss_it, (features, texts))
    return loss_img.detach(), grad_img, loss_it.detach(), grad_it_img, grad_it_text


def sync_bn_run(x, weights, group=None):
    """Output, input gradient of sum(out * weights) and running stats, k view chunks."""
    bn = SyncBatchNorm1d(x.shape[1], group=group)
    x = x.clone().requires_grad_(True)
    out = bn(x, K)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad, bn.running_mean.clone(), bn.running_var.clone()


def local_bn_rows(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank's rows of a view-major global BN batch: its share of each view chunk."""
    chunks = tensor.chunk(K)
    return torch.cat([c.chunk(WORLD)[rank] for c in chunks])


def worker(global_rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=global_rank, world_size=len(TRAINERS) + 1,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        # A subgroup, as the trainer group is: the loss must gather over it, not the world.
        group = dist.new_group(TRAINERS)
        if global_rank not in TRAINERS:
            return
        rank = TRAINERS.index(global_rank)
        g = global_inputs()
        rows = len(g["ids"]) // WORLD
        text_rows = N_CAPTIONS_LOCAL
        mine = slice(rank * rows, (rank + 1) * rows)
        my_texts = slice(rank * text_rows, (rank + 1) * text_rows)
        results = losses_and_grads(
            g["features"][mine], g["ids"][mine], g["texts"][my_texts], g["text_ids"][my_texts],
            group,
        )
        bn = sync_bn_run(
            local_bn_rows(g["bn_input"], rank), local_bn_rows(g["bn_weights"], rank), group
        )
        torch.save({"losses": results, "bn": bn}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    context = mp.spawn(worker, args=(free_port(), out_dir), nprocs=len(TRAINERS) + 1,
                       join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"gloo workers did not finish within {TIMEOUT_S} s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.slow
def test_gathered_losses_and_gradients_match_one_process(rank_results) -> None:
    g = global_inputs()
    loss_img, grad_img, loss_it, grad_it_img, grad_it_text = losses_and_grads(
        g["features"], g["ids"], g["texts"], g["text_ids"]
    )
    per_rank = [r["losses"] for r in rank_results]
    torch.testing.assert_close(torch.stack([r[0] for r in per_rank]).mean(), loss_img)
    torch.testing.assert_close(torch.stack([r[2] for r in per_rank]).mean(), loss_it)
    torch.testing.assert_close(torch.cat([r[1] for r in per_rank]) / WORLD, grad_img)
    torch.testing.assert_close(torch.cat([r[3] for r in per_rank]) / WORLD, grad_it_img)
    torch.testing.assert_close(torch.cat([r[4] for r in per_rank]) / WORLD, grad_it_text)


@pytest.mark.slow
def test_sync_batchnorm_matches_batchnorm_over_both_ranks(rank_results) -> None:
    g = global_inputs()
    out, grad, running_mean, running_var = sync_bn_run(g["bn_input"], g["bn_weights"])
    for rank, result in enumerate(rank_results):
        rank_out, rank_grad, rank_mean, rank_var = result["bn"]
        torch.testing.assert_close(rank_out, local_bn_rows(out, rank))
        # The summed objective spans both ranks; all_reduce's backward delivers its gradient.
        torch.testing.assert_close(rank_grad, local_bn_rows(grad, rank))
        torch.testing.assert_close(rank_mean, running_mean)
        torch.testing.assert_close(rank_var, running_var)
