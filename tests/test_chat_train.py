"""train.py on chat data end to end (torchrun, as a user runs it): `data=chat` prepares the conversations with the
tokenizer's chat template, logs the tokens of each kind and the packing, trains with the assistant's tokens
counted (DP2 with the distributed optimizer, epochs over packed windows), evaluates on the validation split's
packed windows, and a run resumed from its step-2 checkpoint continues bit for bit (the data position).
"""
from __future__ import annotations

import shutil

import pytest

from chat_data import CHATML, conversations, make_tokenizer, write_jsonl
from cli import losses, metrics, torchrun

STEPS = 4
ARGS = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=128",
        "train.global_batch_size=8", "train.micro_batch_size=2", "logging.every=1", "train.eval_every=2",
        "train.eval_iters=1", "optim.warmup_steps=1", "sample.max_new_tokens=0", "logging.wandb.mode=disabled",
        f"train.steps={STEPS}", "checkpoint.every=2", "parallel.zero=1", "data.sampling=epoch",
        "data.val_fraction=0.1"]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_train")
    tok = make_tokenizer(root / "tokenizer", CHATML)
    corpus = write_jsonl(root / "chats.jsonl", conversations(200))
    args = [*ARGS, "data=chat", f"data.paths=[{corpus}]", f"data.tokenizer={tok}", f"data.cache_dir={root / 'cache'}"]
    run = root / "run"
    proc = torchrun(2, *args, f"run_dir={run}")
    return root, args, run, proc.stdout


def test_chat_training_logs_and_learns(chat_run):
    _, _, run, stdout = chat_run
    log = (run / "train.log").read_text()
    assert "chat data: train: " in stdout and "assistant tokens (the loss counts these" in stdout
    assert "train data: " in log and "conversations packed into" in log and "val data: " in log
    train = [m for m in metrics(run) if "loss" in m]
    assert [m["step"] for m in train] == list(range(1, STEPS + 1)) and all("epoch" in m for m in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert [m["step"] for m in metrics(run) if "val_loss" in m] == [2, 4]


def test_chat_training_resumes_bit_for_bit(chat_run, tmp_path):
    root, args, run, _ = chat_run
    resumed = shutil.copytree(run, tmp_path / "run")
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:07d}")
    torchrun(2, *args, f"run_dir={resumed}")
    assert "resumed from" in (resumed / "train.log").read_text()
    assert losses(resumed) == losses(run)  # steps 3 and 4 again: the same floats
    assert [m for m in metrics(resumed) if "val_loss" in m][-1] == [m for m in metrics(run) if "val_loss" in m][-1]
