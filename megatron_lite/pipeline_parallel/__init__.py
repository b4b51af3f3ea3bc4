"""Pipeline parallelism (Narayanan et al. 2021, arXiv 2104.04473, section 2.2): the layers cut into stages on
the ranks of the PP group, micro-batches flowing through them (mirrors Megatron-Core's `pipeline_parallel`).

- layout.py      which layers each stage (and each of its model chunks) holds
- schedules.py   1F1B and interleaved 1F1B as precomputed per-rank programs of passes and exchanges
- p2p.py         the exchanges: batched sends and receives between stages
- executor.py    running a rank's program: the training loop's micro-batch loop at every PP size
"""
from .executor import PipelineExecutor, in_flight_max
from .layout import PipelineLayoutError, describe, layer_counts, stage_chunks
from .schedules import SCHEDULES, Compute, Exchange, ScheduleError, build_programs, compute_order, warmup_forwards

__all__ = ["PipelineExecutor", "in_flight_max", "PipelineLayoutError", "describe", "layer_counts", "stage_chunks",
           "SCHEDULES", "Compute", "Exchange", "ScheduleError", "build_programs", "compute_order", "warmup_forwards"]
