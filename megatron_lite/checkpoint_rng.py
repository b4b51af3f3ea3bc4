"""The dropout RNG streams in a checkpoint: their keys, and which saved entry each stream of this run loads.

A generator's state depends on the kind of device (a CUDA generator's is 16 bytes, a CPU one's 5056: neither
loads into the other), so each entry is keyed by device type; by TP rank for the TP-distinct stream (each TP
rank draws its own dropout masks for its heads, Shoeybi et al. 2019, section 3); and by pipeline stage, as each
stage draws for its own layers (stage 0's keys are those of PP = 1). A checkpoint from another kind of device
reseeds the streams from the seed and the step with one log line, so a GPU run resumes on CPU and back; a
stream with no entry for this rank's place in the layout (another TP or PP size) keeps its seed.
"""
from __future__ import annotations

from typing import Callable

import torch


def rng_key(stream: str, ctx, kind: str | None) -> str:
    """A stream's key for this rank (`kind`: the device type; None: the key of checkpoints from before)."""
    return ("rng." + (f"{kind}." if kind else "") + stream + (f".{ctx.tp_rank}" if stream == "tp" else "")
            + (f".stage{ctx.pp_rank}" if ctx.pp_rank else ""))


def rng_entries(states: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
    """The state dict entries of this rank's streams."""
    return {rng_key(stream, ctx, ctx.device.type): st for stream, st in states.items()}


def rng_to_load(saved: dict, model, ctx, where: str, saved_step: Callable[[], int], log) -> dict[str, str]:
    """stream -> its key in the checkpoint whose metadata is `saved`: this device type's entry (or one from
    before entries were keyed by device, if its size fits). When the streams come from another kind of device,
    `model.rng` is reseeded from the seed and `saved_step()`, and `log` gets one line naming `where`."""
    found = {}
    for stream, state in model.rng.get_states().items():
        for key in (rng_key(stream, ctx, ctx.device.type), rng_key(stream, ctx, None)):
            if key in saved and list(saved[key].size) == list(state.shape):
                found[stream] = key
                break
    # this device's streams but none for this rank's place in the layout (another PP or TP size): they keep their seed
    kinds = sorted({k.split(".")[1] for k in saved if k.startswith("rng.")} - {"shared", "tp"})
    if not found and kinds != [ctx.device.type] and any(k.startswith("rng.") for k in saved):
        step = saved_step()
        model.rng = model.rng.reseeded(1000003 * (step + 1))
        saved_on = ", ".join(kinds) or "not named, of another size: an older checkpoint's"
        log(f"{where}: its dropout RNG streams come from another kind of device ({saved_on}; this run: "
            f"{ctx.device.type}): reseeded them from model.seed and step {step}")
    return found
