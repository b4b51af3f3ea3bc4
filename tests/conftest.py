import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ref(tmp_path_factory) -> Path:
    """The uninterrupted reference run (cli.REF_ARGS): DP2 x TP2 + SP, steps 1..8, checkpoints at 2, 4, 6, 8.
    Session-scoped: the checkpoint and the resilience tests resume, damage and interrupt copies of it."""
    from cli import REF_ARGS, REF_EVERY, REF_STEPS, ckpt_names, loss_steps, torchrun
    run = tmp_path_factory.mktemp("ref") / "run"
    torchrun(4, *REF_ARGS, f"run_dir={run}")
    assert loss_steps(run) == list(range(1, REF_STEPS + 1))
    assert ckpt_names(run) == [f"step_{s:07d}" for s in range(REF_EVERY, REF_STEPS + 1, REF_EVERY)]
    return run
