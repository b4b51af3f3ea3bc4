"""Point-to-point communication between pipeline stages: one batch of sends and receives per exchange.

`P2P.exchange(sends, recvs)` posts every send and receive of one tick of the schedule (schedules.Exchange)
with `torch.distributed.batch_isend_irecv` over the PP group and waits for all of them: Megatron-Core's
`_batched_p2p_ops`. The tensors are the activations and their gradients between stages, `[S, B, H]`, or
the sequence shard `[S/T, B, H]` under sequence parallelism (Narayanan et al. 2021, section 4.1, the
scatter/gather optimization: each TP rank sends only its 1/T of the boundary activation to the same TP rank of
the next stage, which already holds it sharded that way).

Each exchange marks what the rank waits for (what, from or to which rank: hang.waiting_in_p2p) for the hang
report: PyTorch's flight recorder, which names the collective a hung rank waits in, does not record
point-to-point operations on gloo. `P2P.bytes_sent` counts the bytes this
rank sent (benchmarks and tests against 2 (P - 1) m s b h bytes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..hang import waiting_in_p2p
from .schedules import Message


@dataclass
class P2P:
    """Sends and receives between the stages of this rank's pipeline (`ctx.pp_group`)."""
    ctx: object
    bytes_sent: int = 0
    exchanges: int = 0

    def peer(self, virtual_stage: int) -> int:
        """The global rank holding `virtual_stage` in this rank's pipeline (same DP, CP and TP index)."""
        return self.ctx.stage_rank(virtual_stage % self.ctx.pp_size)

    def exchange(self, sends: list[tuple[Message, torch.Tensor]],
                 recvs: list[tuple[Message, torch.Tensor]]) -> None:
        """Post every send and receive of one tick together and wait for all of them; `recvs` are filled."""
        group = self.ctx.pp_group
        ops = [dist.P2POp(dist.isend, t, self.peer(m.dst), group=group) for m, t in sends]
        ops += [dist.P2POp(dist.irecv, t, self.peer(m.src), group=group) for m, t in recvs]
        with waiting_in_p2p(self._describe(sends, recvs)):
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        self.bytes_sent += sum(t.numel() * t.element_size() for _, t in sends)
        self.exchanges += 1

    def _describe(self, sends, recvs) -> str:
        """An exchange with its peers, for the hang report."""
        P = self.ctx.pp_size
        parts = [f"send of micro-batch {m.microbatch}'s {_WHAT[m.kind]} to rank {self.peer(m.dst)} (stage {m.dst % P})"
                 for m, _ in sends]
        parts += [f"recv of micro-batch {m.microbatch}'s {_WHAT[m.kind]} from rank {self.peer(m.src)} "
                  f"(stage {m.src % P})" for m, _ in recvs]
        return f"p2p {' + '.join(parts)} over the PP group {list(dist.get_process_group_ranks(self.ctx.pp_group))}"


_WHAT = {"act": "activations", "grad": "activation gradients"}
