"""torchrun's worker process in the resilience tests: runs train.py as its child and records how it ended.

    torchrun ... tests/as_worker.py OUT_DIR train.py OVERRIDES...

torchrun cannot tell how its workers ended once the agent itself got a signal (it re-raises the signal and
exits 1 whatever they did), so this wrapper writes `OUT_DIR/rank_<RANK>.rc` with its child's exit status and
`OUT_DIR/rank_<RANK>.pid` with the child's pid. It ignores the stop signals itself (torchrun signals the
worker's whole process group: the child gets them too) and passes everything else through.

`FSIZE_RANK=R FSIZE_BYTES=N`: rank R's child may not grow a file past N bytes (RLIMIT_FSIZE, soft limit), so its
checkpoint shard write fails with EFBIG ("File too large", as a full disk fails it) -- a real OS error, as
root too; the test lifts it with `resource.prlimit` on the child's pid.
"""
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path


def main() -> int:
    out, cmd = Path(sys.argv[1]), [sys.executable, *sys.argv[2:]]
    rank = os.environ["RANK"]
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # a handler (not SIG_IGN): the child starts with the defaults

    def limit():
        if os.environ.get("FSIZE_RANK") == rank:
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["FSIZE_BYTES"]), hard))

    child = subprocess.Popen(cmd, preexec_fn=limit)
    (out / f"rank_{rank}.pid").write_text(str(child.pid))
    rc = child.wait()
    (out / f"rank_{rank}.rc").write_text(str(rc))
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
