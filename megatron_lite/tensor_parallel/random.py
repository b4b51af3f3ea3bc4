"""RNG streams for dropout under tensor parallelism, and activation recomputation that replays them.

Dropout on an activation that is replicated over TP must draw the same mask on every TP rank, or the
replicas drift apart; dropout on a sharded activation (attention probabilities of this rank's heads, and
everything under sequence parallelism) must draw different masks on different ranks, or the masks of the
pieces repeat. Megatron keeps a second, TP-distinct CUDA RNG state for the latter (Shoeybi et al. 2019,
section 3, "we maintain a separate random number generator"). `RNGTracker` holds both streams and swaps
one into the device's default generator for the duration of a `fork`, so any torch op that draws
random numbers (F.dropout, SDPA's dropout) uses it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint

SHARED = "shared"  # same on every TP rank: dropout on TP-replicated activations
TP = "tp"  # differs across TP ranks: dropout on TP- or sequence-sharded activations
_TP_SEED_OFFSET = 2718  # Megatron's model-parallel seed offset


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class RNGTracker:
    def __init__(self, seed: int, tp_rank: int, device: torch.device):
        self.seed, self.tp_rank, self.device = seed, tp_rank, torch.device(device)
        self.states: dict[str, torch.Tensor] = {}
        for name, s in ((SHARED, seed), (TP, seed + _TP_SEED_OFFSET + tp_rank)):
            gen = torch.Generator(self.device)
            gen.manual_seed(s)
            self.states[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str):
        """Run the block with stream `name` as the device's default generator; the outer state is kept."""
        gen = _default_generator(self.device)
        outer = gen.get_state()
        gen.set_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = gen.get_state()
            gen.set_state(outer)

    def reseeded(self, salt: int) -> "RNGTracker":
        """The streams seeded again from seed + salt (streams saved on another kind of device do not load)."""
        return RNGTracker(self.seed + salt, self.tp_rank, self.device)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}


def checkpoint(fn, tracker: RNGTracker, *args):
    """`torch.utils.checkpoint` that also replays the tracker's streams, so dropout masks recomputed in
    backward equal those of the forward pass (Korthikanti et al. 2022, section 5)."""
    def context_fn():
        saved = tracker.get_states()

        @contextlib.contextmanager
        def replay():
            current = tracker.get_states()
            tracker.set_states(saved)
            try:
                yield
            finally:
                tracker.set_states(current)
        return contextlib.nullcontext(), replay()

    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)
