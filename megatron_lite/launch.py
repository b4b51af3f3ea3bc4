"""torchrun, except that a job stopped cleanly by a signal exits 0.

    python -m megatron_lite.launch [torchrun options] train.py [overrides]     (same arguments as torchrun)

torchrun's agent (torch 2.13, `elastic/agent/server/api.py`) forwards SIGTERM to its workers, waits for
them (`--shutdown-timeout`), then re-raises the signal, so `torchrun` exits 1 even when every worker stopped
at a step boundary with a checkpoint (resilience.py). A job script cannot tell that clean stop from a crash by
the exit status. This runs the same launcher in this process, and when the agent ends on a signal it exits 0
if the workers reported a clean stop -- local rank 0 of each node writes the run's status ("stopped N
<reason>") to the file named by MEGATRON_LITE_STATUS_FILE -- and re-raises otherwise. Everything else is
torchrun's own behaviour.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

STATUS_FILE_ENV = "MEGATRON_LITE_STATUS_FILE"


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    fd, status = tempfile.mkstemp(prefix="megatron-lite-status-")
    os.close(fd)
    os.environ[STATUS_FILE_ENV] = status  # the workers inherit the agent's environment
    try:
        torchrun(argv)
    except SignalException as e:
        text = Path(status).read_text().strip()
        if not text.startswith("stopped"):
            raise
        print(f"megatron_lite.launch: the workers stopped cleanly on signal {e.sigval.name} ({text}): exit 0",
              file=sys.stderr, flush=True)
    finally:
        os.unlink(status)


if __name__ == "__main__":
    main()
