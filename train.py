"""Train a GPT with tensor (+ sequence) parallelism inside a node and data parallelism across TP groups.

The world is a DP x TP grid: parallel.tp consecutive ranks hold one model replica, split Megatron-style;
data parallel size = world size / parallel.tp. Any key of configs/ (schema: megatron_lite/config.py) can be
overridden on the command line, Hydra style (key=value).

One process (CPU or one GPU; parallel.tp defaults to 1):
    python train.py
One GPU, a GPT-2 small shape:
    python train.py model=gpt2-small train.micro_batch_size=8 train.global_batch_size=64
One node, 4 processes (DP=2 x TP=2):
    torchrun --standalone --nproc_per_node=4 train.py parallel.tp=2
Several nodes (run this on every node; TP stays inside a node, DP spans the nodes):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=myjob \\
        train.py run_dir=/shared/runs/myjob parallel.tp=8
Your own text, a bigger model, wandb:
    torchrun --standalone --nproc_per_node=4 train.py data=text 'data.paths=[corpus/*.txt]' model=gpt2-small \\
        logging.wandb.mode=online
Prepare a big corpus ahead of training (same overrides; train.py then finds the cache):
    python -m megatron_lite.data data=text 'data.paths=[corpus/**/*.jsonl.gz]' data.workers=16
Print the composed config (every key) without running:
    python train.py --cfg job

Each job writes to run_dir (default runs/<torchrun job id or start time>); rerunning with the same run_dir
resumes from its newest checkpoint (checkpoint.resume=auto). The configuration is checked on every rank
before any process group exists: a bad value exits with status 2 and one `error: ...` line.

Exit status: 0 when the run finished, or stopped cleanly with a checkpoint (SIGTERM/SIGUSR1, train.max_minutes;
<run_dir>/status says which); 1 when it diverged or a checkpoint could not be saved (checkpoint.on_error=stop);
2 for bad input; 3 for a hang (train.hang_timeout_s; reports in <run_dir>/hang/); 128+N when signal N came
twice or train.exit_grace_s ran out. README "Running on a cluster" has a Slurm script.
"""
import os
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from megatron_lite.config import Config, ConfigError, validate  # also registers the schema with Hydra
from megatron_lite.data import DataError


def _fail(message: str, status: int = 2) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one copy per node, not one per rank
        print(f"error: {message}", file=sys.stderr)
    else:  # torchrun SIGTERMs all workers when the first one exits: give local rank 0 time to print
        time.sleep(5)
    sys.exit(status)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(dict_cfg: DictConfig) -> None:
    try:
        cfg: Config = OmegaConf.to_object(dict_cfg)
    except MissingMandatoryValue as e:
        _fail(f"{e.full_key} is required: set it on the command line ({e.full_key}=...)")
    try:
        validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as e:
        _fail(str(e))
    from megatron_lite.checkpoint import CheckpointSaveError
    from megatron_lite.trainer import DivergenceError, train  # only now: bad input never starts a process group

    try:
        train(cfg)
    except (DivergenceError, CheckpointSaveError) as e:
        _fail(str(e), status=1)
    except DataError as e:  # bad corpus content, or resuming on another corpus: found once the job has started
        _fail(str(e))


if __name__ == "__main__":
    main()
