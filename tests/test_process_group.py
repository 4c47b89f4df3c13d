"""The gloo process groups: one worker thread each, and concurrent async collectives stay correct.

torch 2.13's gloo corrupts the heap when a group's two worker threads run async collectives at the
same time (see recsys.parallelize.SerialGloo). The stress below is the pattern of a training step
(an uneven all-to-all in flight while autograd all-gathers and a reduce-scatter run); with gloo's
default two threads it killed 4 of 7 runs of 3,000 steps by SIGSEGV.
"""

from __future__ import annotations

import torch

STEPS = 2000


def group_threads():
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from recsys.parallelize import destroy_distributed, init_distributed

    init_distributed("cpu")
    world = dist.group.WORLD
    node = dist.new_group([dist.get_rank()])  # as TorchRec makes its intra-node groups
    backends = [g._get_backend(torch.device("cpu")) for g in (world, node)]
    out = {
        "threads": [b.options._threads for b in backends],
        # torch's own checks (e.g. which backends get a new timeout) still see gloo backends
        "gloo": [isinstance(b, c10d.ProcessGroupGloo) for b in backends],
        "backend": dist.get_backend(),
    }
    destroy_distributed()
    return out


def test_every_gloo_group_has_one_thread(two_ranks):
    for result in two_ranks(group_threads):
        assert result == {"threads": [1, 1], "gloo": [True, True], "backend": "gloo"}


def concurrent_collectives(steps: int):
    import torch.distributed as dist

    from recsys.loss import _all_gather, _all_gather_autograd  # what the loss gathers with
    from recsys.parallelize import destroy_distributed, init_distributed

    init_distributed("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()

    def split(step, src, dst):  # rows rank src sends to rank dst at this step, known to both
        return 1 + (step * 7 + src * 3 + dst * 5) % 300

    wrong = []
    for step in range(steps):
        send = [split(step, rank, j) for j in range(world)]
        recv_sizes = torch.empty(world, dtype=torch.int64)  # the sizes travel first, as TorchRec's splits do
        dist.all_to_all_single(recv_sizes, torch.tensor(send))
        recv = recv_sizes.tolist()
        if recv != [split(step, i, rank) for i in range(world)]:
            wrong.append(step)
        x = torch.cat([torch.full((n,), float(rank * 1000 + j), dtype=torch.float32) for j, n in enumerate(send)])
        a2a_out = torch.empty(sum(recv))
        a2a = dist.all_to_all_single(a2a_out, x, recv, send, async_op=True)
        y = torch.full((64, 16), float(rank + step), requires_grad=True)
        gathered = _all_gather_autograd(y, gather_dim=0, group=dist.group.WORLD)
        ids = _all_gather(torch.arange(64) + rank, gather_dim=0, group=dist.group.WORLD)
        doubled = _all_gather_autograd(y * 2, gather_dim=0, group=dist.group.WORLD)
        (gathered.sum() + doubled.pow(2).sum()).backward()
        rs_out = torch.empty(32, 8)
        rs = dist.reduce_scatter_tensor(rs_out, torch.full((world * 32, 8), float(step)), async_op=True)
        a2a.wait()
        rs.wait()
        expect = torch.cat([torch.full((n,), float(i * 1000 + rank)) for i, n in enumerate(recv)])
        rows = torch.arange(world).repeat_interleave(64).float()[:, None] + step
        if not (torch.equal(a2a_out, expect) and torch.equal(gathered.detach(), rows.expand(-1, 16))
                and torch.equal(ids, torch.arange(64).repeat(world) + torch.arange(world).repeat_interleave(64))
                and torch.equal(rs_out, torch.full((32, 8), float(step * world)))):
            wrong.append(step)
        # d/dy of sum(all_gather(y)) + sum(all_gather(2y)^2), summed over the ranks' losses
        if not torch.allclose(y.grad, world * (1 + 8 * y.detach())):
            wrong.append(step)
    destroy_distributed()
    return wrong


def test_concurrent_async_collectives_are_correct_and_do_not_crash(two_ranks):
    # A crashed rank fails the job (at once: the pool sees it die); a wrong value names the step.
    assert two_ranks(concurrent_collectives, STEPS, timeout=240) == [[], []]
