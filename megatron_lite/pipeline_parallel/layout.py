"""Which layers each pipeline stage holds: the split of the model into P stages of V model chunks each.

The model is cut into P x V *virtual stages* in model order; virtual stage k = v * P + p is model chunk v of
pipeline rank p (Narayanan et al. 2021, section 2.2.2: with V > 1 each rank holds V non-adjacent chunks, so a
micro-batch visits every rank V times). The embedding lives on the first virtual stage (rank 0, chunk 0), the
final norm, the output layer and the loss on the last (rank P-1, chunk V-1), as Megatron's `pre_process` /
`post_process`. Layers keep their global index wherever they live, so parameter names (`blocks.17.*`) are the
same at every P and V.

By default the layers are split evenly (num_layers divisible by P x V); `parallel.pp_layers` gives the number
of layers of each virtual stage in model order (length P x V) for an uneven split, e.g. fewer layers on the
first and last stage, which also hold the embedding and the output layer.
"""
from __future__ import annotations


class PipelineLayoutError(ValueError):
    """A split of the layers, or a number of micro-batches, that the pipeline cannot run."""


def layer_counts(num_layers: int, pp_size: int, virtual: int = 1, pp_layers: list[int] | None = None) -> list[int]:
    """Layers of each virtual stage, in model order (P x V entries); raises PipelineLayoutError naming the fix."""
    stages = pp_size * virtual
    what = f"parallel.pp={pp_size}" + (f" x parallel.pp_virtual={virtual}" if virtual > 1 else "")
    if pp_layers is not None:
        counts = list(pp_layers)
        if len(counts) != stages or any(n < 0 for n in counts) or sum(counts) != num_layers:
            raise PipelineLayoutError(
                f"parallel.pp_layers={counts} must give {stages} non-negative layer counts ({what} virtual stages, "
                f"in model order) summing to model.num_layers={num_layers}, e.g. {_suggest(num_layers, stages)}")
        return counts
    if num_layers % stages:
        divisors = [p for p in range(1, num_layers + 1) if num_layers % (p * virtual) == 0]
        raise PipelineLayoutError(
            f"model.num_layers={num_layers} is not divisible by {what} = {stages} stages: pick parallel.pp in "
            f"{divisors} or give an uneven split, e.g. parallel.pp_layers={_suggest(num_layers, stages)}")
    return [num_layers // stages] * stages


def _suggest(num_layers: int, stages: int) -> str:
    """An even-as-possible split, the extra layers on the middle stages (the ends hold embedding and head)."""
    base, extra = divmod(num_layers, stages)
    counts = [base] * stages
    order = sorted(range(stages), key=lambda k: abs(k - (stages - 1) / 2))
    for k in order[:extra]:
        counts[k] += 1
    return "[" + ",".join(map(str, counts)) + "]"


def stage_chunks(num_layers: int, pp_size: int, pp_rank: int, virtual: int = 1,
                 pp_layers: list[int] | None = None) -> list[list[int]]:
    """The global layer indices of each model chunk of pipeline rank `pp_rank`: chunks[v] = virtual stage
    v * P + pp_rank's layers."""
    counts = layer_counts(num_layers, pp_size, virtual, pp_layers)
    starts = [sum(counts[:k]) for k in range(len(counts))]
    return [list(range(starts[v * pp_size + pp_rank], starts[v * pp_size + pp_rank] + counts[v * pp_size + pp_rank]))
            for v in range(virtual)]


def describe(num_layers: int, pp_size: int, virtual: int = 1, pp_layers: list[int] | None = None,
             tied: bool = True) -> str:
    """One line: what each stage holds, e.g. 'stage 0: embedding + layers 0-1; stage 1: layers 2-3 + head'."""
    parts = []
    for p in range(pp_size):
        chunks = stage_chunks(num_layers, pp_size, p, virtual, pp_layers)
        held = []
        if p == 0:
            held.append("embedding")
        held += [_span(c) for c in chunks]
        if p == pp_size - 1:
            held.append("final norm + output layer" + (" (a copy of the tied embedding)" if tied and p else ""))
        parts.append(f"stage {p}: " + " + ".join(h for h in held if h))
    return "; ".join(parts)


def _span(layers: list[int]) -> str:
    if not layers:
        return "no layers"
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
