"""Global in-batch negatives: per-rank gradients equal the single-process global-batch loss's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.loss import sampled_softmax_loss

B, N, D, NUM_ITEMS, TEMP = 12, 6, 5, 9, 0.5


def inputs(world: int):
    rng = np.random.default_rng(0)
    return {
        "u": rng.standard_normal((world * B, D)).astype(np.float32),
        "pos": rng.standard_normal((world * B, D)).astype(np.float32),
        "neg": rng.standard_normal((world * N, D)).astype(np.float32),
        "user_ids": rng.integers(0, 6, world * B),  # repeated users and items: accidental hits occur
        "pos_ids": rng.integers(0, NUM_ITEMS, world * B),
        "neg_ids": rng.integers(0, NUM_ITEMS, world * N),
        "log_prob": np.log(rng.dirichlet(np.ones(NUM_ITEMS))).astype(np.float32),
    }


def loss_and_grads(x, rows: slice, negs: slice, logq: bool):
    u = torch.tensor(x["u"][rows], requires_grad=True)
    items = torch.tensor(np.concatenate([x["pos"][rows], x["neg"][negs]]), requires_grad=True)
    item_ids = torch.from_numpy(np.concatenate([x["pos_ids"][rows], x["neg_ids"][negs]]))
    loss = sampled_softmax_loss(u, items, torch.from_numpy(x["user_ids"][rows]), item_ids, TEMP, True,
                                torch.from_numpy(x["log_prob"]) if logq else None, NUM_ITEMS)
    loss.backward()
    return loss.item(), u.grad.numpy(), items.grad.numpy()


def rank_worker(logq: bool):
    import torch.distributed as dist

    from recsys.parallelize import init_distributed

    init_distributed("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    x = inputs(world)
    out = loss_and_grads(x, slice(rank * B, (rank + 1) * B), slice(rank * N, (rank + 1) * N), logq)
    dist.barrier()
    dist.destroy_process_group()
    return out


@pytest.mark.parametrize("logq", [False, True])
def test_two_ranks_match_global_batch(two_ranks, logq):
    world = 2
    x = inputs(world)
    ref_loss, ref_u, ref_items = loss_and_grads(x, slice(None), slice(None), logq)
    ref_pos, ref_neg = ref_items[: world * B], ref_items[world * B:]
    results = two_ranks(rank_worker, logq)
    # The mean of the ranks' losses is the global-batch loss.
    assert np.mean([r[0] for r in results]) == pytest.approx(ref_loss, rel=1e-6)
    for rank, (_, g_u, g_items) in enumerate(results):
        # Each rank's backward brings every rank's gradient for its own rows (reduce-scatter of
        # the all-gather): world x the global-mean gradient, which the sharded tables average.
        rows = slice(rank * B, (rank + 1) * B)
        np.testing.assert_allclose(g_u / world, ref_u[rows], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g_items[:B] / world, ref_pos[rows], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g_items[B:] / world, ref_neg[rank * N:(rank + 1) * N], rtol=1e-5, atol=1e-7)


def test_accidental_hits_are_masked():
    # Rows 0 and 1 belong to the same user (items 3 and 4); one uniform negative, item 3.
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    items = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    user_ids, item_ids = torch.tensor([0, 0]), torch.tensor([3, 4, 3])
    loss = sampled_softmax_loss(u, items, user_ids, item_ids, temperature=1.0)
    # Row 0: row 1's item is a known positive of the same user (masked), the negative is its
    # own item 3 (masked): only the label is left, loss 0. Row 1: row 0 masked (same user),
    # the negative (logit 0) against the label (logit 1) stays.
    assert loss.item() == pytest.approx((0.0 + math.log(1 + math.exp(-1.0))) / 2, rel=1e-6)
    unmasked = sampled_softmax_loss(u, items, user_ids, item_ids, 1.0, mask_accidental_hits=False)
    assert unmasked.item() == pytest.approx(math.log(2 + math.exp(-1.0)) + 0.0, rel=1e-6)


def test_margin_and_bpr_against_direct_formulas():
    from recsys.loss import bpr_loss

    x = inputs(1)
    u, pos, neg = (torch.from_numpy(x[k]) for k in ("u", "pos", "neg"))
    items = torch.cat([pos, neg])
    item_ids = torch.from_numpy(np.concatenate([x["pos_ids"], x["neg_ids"]]))
    user_ids = torch.from_numpy(x["user_ids"])
    # margin m: the positive's logit is (s - m) / T; without masking the loss is plain cross-entropy
    got = sampled_softmax_loss(u, items, user_ids, item_ids, TEMP, False, None, 0, margin=0.3)
    scores = (u @ items.T).numpy().astype(np.float64)
    scores[np.arange(B), np.arange(B)] -= 0.3
    logits = scores / TEMP
    expected = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(B), np.arange(B)])
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # BPR: row i against negative i mod N
    got = bpr_loss(u, items, temperature=2.0)
    diff = ((u * pos).sum(1) - (u * neg[torch.arange(B) % N]).sum(1)).numpy() / 2.0
    assert got.item() == pytest.approx(np.mean(np.log1p(np.exp(-diff))), rel=1e-5)
