"""The configuration: Hydra schema, presets, and the checks that run before any process group exists.

The CLI cases run train.py as a user would, all at once in a thread pool (each is mostly interpreter and
torch import time), each in an empty working directory that must still be empty afterwards.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from megatron_lite.config import Config, ConfigError, dp_size, gpt_config, grad_accum_steps, validate
from megatron_lite.data import DataConfig
from megatron_lite.parallel import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # after sys.executable

# name: (command after the interpreter, extra env, substrings the output must contain)
FAILING = {
    "world_size": ([TRAIN, "parallel.tp=3"], {"WORLD_SIZE": "4"}, ["world size 4", "parallel.tp=3"]),
    "num_heads": ([TRAIN, "parallel.tp=3"], {"WORLD_SIZE": "3"}, ["model.num_heads=4", "parallel.tp=3"]),
    "ffn": ([TRAIN, "parallel.tp=2", "model.ffn_hidden_size=511"], {"WORLD_SIZE": "2"},
            ["model.ffn_hidden_size=511", "tp=2"]),
    "seq_len_sp": ([TRAIN, "parallel.tp=2", "model.seq_len=127"], {"WORLD_SIZE": "2"},
                   ["model.seq_len=127", "parallel.sp=false"]),
    "hidden_heads": ([TRAIN, "parallel.tp=1", "model.num_heads=3"], {},
                     ["model.hidden_size=128", "model.num_heads=3"]),
    "global_batch": ([TRAIN, "parallel.tp=2", "train.global_batch_size=20"], {"WORLD_SIZE": "4"},
                     ["train.global_batch_size=20", "DP=2", "use train.global_batch_size=24"]),
    "data_path": ([TRAIN, "parallel.tp=1", "data=text", "data.paths=[/nonexistent/x.txt]"], {},
                  ["/nonexistent/x.txt"]),
    "data_paths_missing": ([TRAIN, "parallel.tp=1", "data=text"], {}, ["data.paths"]),
    "lr_zero": ([TRAIN, "parallel.tp=1", "optim.lr=0"], {}, ["optim.lr=0"]),
    # context parallelism: 2 x cp chunks per window (x tp under SP); no attention dropout in ring attention
    "cp_seq_len": ([TRAIN, "parallel.cp=2", "model.seq_len=126"], {"WORLD_SIZE": "2"},
                   ["model.seq_len=126 is not divisible by 2 x parallel.cp=2 = 4", "use model.seq_len=128"]),
    "cp_seq_len_sp": ([TRAIN, "parallel.cp=2", "parallel.tp=2", "model.seq_len=132"], {"WORLD_SIZE": "4"},
                      ["model.seq_len=132 is not divisible by 2 x parallel.cp=2 x parallel.tp=2 = 8",
                       "or parallel.sp=false"]),
    "cp_world": ([TRAIN, "parallel.cp=3"], {"WORLD_SIZE": "4"}, ["world size 4 is not divisible by parallel.cp=3"]),
    "cp_dropout": ([TRAIN, "parallel.cp=2", "model.dropout=0.1"], {"WORLD_SIZE": "2"},
                   ["model.dropout=0.1 with parallel.cp=2", "set model.dropout=0"]),
    "lr_negative": ([TRAIN, "parallel.tp=1", "optim.lr=-1"], {}, ["optim.lr=-1"]),
    # Hugging Face model directories (made by the `cli` fixture under {hf}) as checkpoint.load
    "hf_architecture": ([TRAIN, "parallel.tp=1", "checkpoint.load={hf}/gemma"], {},
                        ["architecture 'GemmaForCausalLM' is not supported",
                         "GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"]),
    "hf_missing_weights": ([TRAIN, "parallel.tp=1", "checkpoint.load={hf}/llama_sharded"], {},
                           ["llama_sharded/model-00002-of-00002.safetensors is missing"]),
    "hf_no_tokenizer": ([TRAIN, "checkpoint.load={hf}/llama"], {},
                        ["tokenizer directory", "/llama holds no tokenizer: looked for tokenizer.json",
                         "name one with data.tokenizer=PATH"]),
    "hf_tp_split": ([TRAIN, "parallel.tp=4", "checkpoint.load={hf}/llama_tokenizer"], {"WORLD_SIZE": "4"},
                    ["model.num_heads=4 and model.num_kv_heads=2 must both be divisible by parallel.tp=4",
                     "valid tp: 1, 2"]),
    "pp_microbatches": ([TRAIN, "parallel.pp=4", "train.global_batch_size=8"], {"WORLD_SIZE": "4"},
                        ["2 micro-batches per step", "fewer than the parallel.pp=4 stages"]),
    # Hydra's own messages
    "unknown_key": ([TRAIN, "train.stepz=5"], {}, ["Key 'stepz' not in 'TrainConfig'"]),
    "bad_type": ([TRAIN, "train.steps=abc"], {}, ["Value 'abc'", "train.steps"]),
    # a real torchrun job: both ranks fail fast, before any process group; only LOCAL_RANK 0 prints
    "torchrun": ([*TORCHRUN, TRAIN, "parallel.tp=4"], {}, ["world size 2 is not divisible by parallel.tp=4"]),
    # torchrun with a fixed port and no --standalone / --rdzv-id: static rendezvous, whose job id is "none"
    "torchrun_static": (["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}", TRAIN],
                        {}, ["run_dir=runs/none", "--rdzv-id"]),
}
HYDRA = {"unknown_key", "bad_type"}  # the rest are ours: one `error: ...` line and status 2
# In `-m slow` only (each a process start, ~3 s of a 2-core machine): rules test_validate_* checks in-process;
# the default run keeps one CLI case of each kind of rule.
SLOW_CLI = {"num_heads", "ffn", "seq_len_sp", "hidden_heads", "lr_zero", "lr_negative", "global_batch",
            "data_paths_missing", "cp_seq_len_sp", "cp_world", "cp_dropout", "hf_no_tokenizer", "hf_missing_weights",
            "bad_type"}
PASSING = {"cfg_job": ([TRAIN, "--cfg", "job"], {}, [])}  # composes and prints the config, runs nothing


def _hf_dirs(root: Path) -> Path:
    """HF model directories, each wrong in one way (validation reads no weight, so empty files do): an
    unsupported architecture; a Llama whose second weight shard is missing; one without a tokenizer; one with
    a tokenizer, whose 2 KV heads do not split over TP=4."""
    from tokenizers import Tokenizer, models
    llama = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=320)
    for name, config in (("gemma", dict(llama, architectures=["GemmaForCausalLM"], model_type="gemma")),
                         ("llama_sharded", llama), ("llama", llama), ("llama_tokenizer", llama)):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
    for name in ("llama", "llama_tokenizer"):
        (root / name / "model.safetensors").write_bytes(b"")
    Tokenizer(models.BPE(vocab={"a": 0, "</s>": 1}, merges=[])).save(str(root / "llama_tokenizer" / "tokenizer.json"))
    (root / "llama_sharded" / "model-00001-of-00002.safetensors").write_bytes(b"")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (root / "llama_sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def _run(case, tmp: Path, hf: Path):
    args, env_extra, _ = case
    args = [a.replace("{hf}", str(hf)) for a in args]
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "HYDRA_FULL_ERROR") and not k.startswith("TORCHELASTIC")}
    if "WORLD_SIZE" in env_extra:
        env.update(RANK="0", LOCAL_RANK="0")
    env.update(env_extra, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    tmp.mkdir()
    p = subprocess.run([sys.executable, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr, p.stderr, sorted(os.listdir(tmp))


@pytest.fixture(scope="module")
def cli(tmp_path_factory, request):
    """The selected cases, run concurrently (those `-m` leaves out are not run)."""
    rejects = {item.callspec.params["name"] for item in request.session.items if item.originalname == "test_cli_rejects"}
    cases = {name: case for name, case in {**FAILING, **PASSING}.items() if name in rejects or name in PASSING}
    base = tmp_path_factory.mktemp("cli")
    hf = _hf_dirs(tmp_path_factory.mktemp("hf"))
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(_run, case, base / name, hf) for name, case in cases.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CLI else n for n in sorted(FAILING)])
def test_cli_rejects(cli, name):
    rc, out, err, left = cli[name]
    assert rc != 0, out
    for s in FAILING[name][2]:
        assert s in out, out
    if name not in HYDRA:  # exactly one `error: ...` line (torchrun adds its own failure report)
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, err
        if not name.startswith("torchrun"):
            assert rc == 2 and err.strip() == lines[0], err
    assert left == [], f"the failed run left {left} in its working directory"


REQUIRED = ["run_dir", "parallel.tp", "parallel.sp", "model.num_layers", "model.hidden_size", "model.num_heads",
            "model.ffn_hidden_size", "model.seq_len", "model.dropout", "train.steps", "train.global_batch_size",
            "train.micro_batch_size", "train.seed", "optim.lr", "logging.every", "logging.wandb.mode",
            "checkpoint.every", "data.name", "data.paths", "data.vocab_size", "sample.prompt"]


def test_cfg_job_prints_every_key(cli):
    rc, out, err, left = cli["cfg_job"]
    assert rc == 0 and left == [], out
    cfg = yaml.safe_load(out)
    for key in REQUIRED:
        node = cfg
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} missing from --cfg job:\n{out}"
            node = node[part]
    assert "TORCHELASTIC_RUN_ID" in cfg["run_dir"]
    assert cfg["parallel"] == {"tp": 1, "cp": 1, "pp": 1, "pp_schedule": "1f1b", "pp_virtual": 1, "pp_layers": None,
                               "sp": True, "tp_comm_overlap": True, "zero": 0}
    assert (cfg["train"]["steps"], cfg["model"]["name"]) == (500, "tiny")
    assert (cfg["checkpoint"]["on_error"], cfg["train"]["hang_timeout_s"], cfg["train"]["exit_signals"]) == \
        ("stop", 300.0, ["SIGTERM", "SIGUSR1"])


def _compose(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize("preset,layers,hidden,heads", [
    ("tiny", 4, 128, 4), ("gpt2-small", 12, 768, 12), ("gpt2-medium", 24, 1024, 16),
    ("gpt2-large", 36, 1280, 20), ("gpt2-xl", 48, 1600, 25)])
def test_model_presets(preset, layers, hidden, heads):
    cfg = _compose(f"model={preset}")
    m = cfg.model
    assert isinstance(cfg, Config) and m.name == preset
    assert (m.num_layers, m.hidden_size, m.num_heads, m.dropout) == (layers, hidden, heads, 0.0)
    assert gpt_config(cfg).ffn_hidden_size == 4 * hidden
    if preset != "tiny":
        assert m.seq_len == 1024
    cfg.parallel.tp = 1 if heads == 25 else 4  # GPT-2 XL's 25 heads do not split 2, 4 or 8 ways
    validate(cfg, world_size=2 * cfg.parallel.tp)


def test_compose_defaults_and_overrides(monkeypatch):
    cfg = _compose("optim.lr=1e-3", "data=text", "data.paths=[a.txt,'docs/*.md']")
    assert cfg.optim.min_lr == pytest.approx(1e-4)  # min_lr follows lr
    assert cfg.data.name == "text" and cfg.data.paths == ["a.txt", "docs/*.md"]
    assert cfg.run_dir.startswith("runs/")
    with pytest.raises(ConfigError, match="unknown key train.stepz"):  # `+` gets past Hydra's struct mode
        validate(_compose("parallel.tp=1", "+train.stepz=5"), 1)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")  # what torchrun gives every rank of one job
    assert _compose().run_dir == "runs/job42"


# ---------------------------------------------------------------- validate() on Config objects


def _cfg(**sections) -> Config:
    cfg = Config(run_dir="runs/test")
    for key, value in sections.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    return cfg


def _fails(cfg: Config, world_size: int, *needles: str) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def test_validate_accepts_defaults():
    for world in (1, 2, 4):  # parallel.tp=1: DP = world size
        validate(_cfg(), world)
    for world in (2, 4, 8):
        validate(_cfg(parallel__tp=2), world)
    _fails(_cfg(), 8, "DP=8", "use train.global_batch_size=32")  # 16 sequences do not split over 8 x 4
    assert issubclass(ConfigError, ValueError)


def test_sizes():
    cfg = _cfg(parallel__tp=2)
    assert (dp_size(cfg, 4), grad_accum_steps(cfg, 4)) == (2, 2)  # 16 = 4 micro x 2 DP x 2 accumulation
    assert (dp_size(cfg, 8), grad_accum_steps(cfg, 8)) == (4, 1)
    assert (dp_size(cfg, 2), grad_accum_steps(cfg, 2)) == (1, 4)


def test_gpt_config_mapping():
    cfg = _cfg(data__vocab_size=1000, parallel__sp=False, train__seed=7, model__hidden_size=64)
    g = gpt_config(cfg)
    assert (g.vocab_size, g.sequence_parallel, g.seed, g.ffn_hidden_size) == (1000, False, 7, 256)
    names = {f.name for f in dataclasses.fields(Config().model)}
    assert names - {"name"} <= {f.name for f in dataclasses.fields(g)}


def test_validate_cross_field_rules():
    _fails(_cfg(parallel__tp=2), 3, "world size 3", "parallel.tp=2")
    _fails(_cfg(parallel__tp=8), 8, "model.num_heads=4", "parallel.tp=8")
    _fails(_cfg(parallel__tp=2, model__ffn_hidden_size=513), 2, "model.ffn_hidden_size=513")
    _fails(_cfg(parallel__tp=2, model__seq_len=129), 2, "model.seq_len=129", "parallel.sp=false")
    validate(_cfg(parallel__tp=2, model__seq_len=129, parallel__sp=False), 2)  # only SP shards the sequence
    _fails(_cfg(model__num_heads=6), 2, "model.hidden_size=128", "model.num_heads=6")
    msg = _fails(_cfg(parallel__tp=2, train__global_batch_size=12), 8, "train.global_batch_size=12", "DP=4", "= 16")
    assert "use train.global_batch_size=16" in msg
    _fails(_cfg(parallel__tp=2, train__global_batch_size=0), 2, "use train.global_batch_size=4")
    _fails(_cfg(train__steps=0), 2, "train.steps=0")
    _fails(_cfg(train__micro_batch_size=0), 2, "train.micro_batch_size=0")
    _fails(_cfg(optim__warmup_steps=-1), 2, "optim.warmup_steps=-1")
    _fails(_cfg(optim__lr=0.0), 2, "optim.lr=0.0")
    _fails(_cfg(optim__lr=float("nan")), 2, "optim.lr=nan")
    _fails(_cfg(optim__min_lr=1.0), 2, "optim.min_lr=1.0")
    _fails(_cfg(optim__beta2=1.0), 2, "optim.beta2=1.0")
    _fails(_cfg(train__dtype="fp16"), 2, "train.dtype='fp16'", "bfloat16")
    _fails(_cfg(model__recompute="some"), 2, "model.recompute='some'")
    _fails(_cfg(parallel__zero=2), 4, "parallel.zero=2", "must be 0", "or 1")
    _fails(_cfg(checkpoint__resume="yes"), 2, "checkpoint.resume='yes'")
    _fails(_cfg(checkpoint__load="/nonexistent/ckpt"), 2, "checkpoint.load=/nonexistent/ckpt")
    _fails(_cfg(checkpoint__keep=0), 2, "checkpoint.keep=0")
    _fails(_cfg(logging__every=0), 2, "logging.every=0")
    _fails(_cfg(sample__top_k=0), 2, "sample.top_k=0")
    _fails(_cfg(train__max_minutes=0.0), 2, "train.max_minutes=0.0")
    _fails(_cfg(train__hang_timeout_s=-1.0), 2, "train.hang_timeout_s=-1")
    _fails(_cfg(train__exit_grace_s=0.0), 2, "train.exit_grace_s=0")
    _fails(_cfg(train__exit_signals=["SIGTERMM"]), 2, "'SIGTERMM'")
    _fails(_cfg(train__exit_signals=["SIGKILL"]), 2, "'SIGKILL'", "cannot be caught")
    _fails(_cfg(train__hang_timeout_s=900.0), 2, "train.hang_timeout_s=900", "collective timeout")
    _fails(_cfg(checkpoint__on_error="ignore"), 2, "checkpoint.on_error='ignore'", "stop, warn")
    validate(_cfg(train__max_minutes=0.5, train__hang_timeout_s=0.0, train__exit_signals=["SIGUSR2"]), 2)


def test_validate_pipeline_layouts():
    validate(_cfg(parallel__pp=2), 4)  # DP2 x PP2: 2 micro-batches of 4 per step, 2 stages of 2 layers
    validate(_cfg(parallel__pp=2, parallel__tp=2), 8)
    validate(_cfg(parallel__pp=3, parallel__pp_layers=[1, 2, 1]), 3)
    validate(_cfg(parallel__pp=2, parallel__pp_schedule="interleaved", parallel__pp_virtual=2), 2)
    _fails(_cfg(parallel__pp=3), 4, "world size 4 is not divisible by parallel.pp=3")
    _fails(_cfg(parallel__pp=3), 3, "model.num_layers=4 is not divisible by parallel.pp=3", "[1, 2, 4]",
           "parallel.pp_layers=[1,2,1]")
    _fails(_cfg(parallel__pp=2, parallel__pp_layers=[3, 2]), 2, "parallel.pp_layers=[3, 2]", "model.num_layers=4")
    _fails(_cfg(parallel__pp=4), 8, "2 micro-batches per step", "parallel.pp=4", "use at least 4")
    _fails(_cfg(parallel__pp=2, parallel__pp_schedule="interleaved", parallel__pp_virtual=2,
                train__global_batch_size=12), 2, "groups of parallel.pp=2", "3 per step", "(e.g. 4)")
    _fails(_cfg(parallel__pp=2, parallel__pp_schedule="interleaved", parallel__pp_virtual=3), 2,
           "model.num_layers=4 is not divisible by parallel.pp=2 x parallel.pp_virtual=3 = 6 stages")
    _fails(_cfg(parallel__pp=2, parallel__pp_virtual=2), 2, "parallel.pp_virtual=2 needs parallel.pp_schedule=interleaved")
    _fails(_cfg(parallel__pp_schedule="interleaved", parallel__pp_virtual=2), 2, "needs parallel.pp >= 2")


def test_validate_data():
    cfg = _cfg()
    cfg.data = DataConfig(name="text", paths=["/nonexistent/x.txt"])
    _fails(cfg, 2, "/nonexistent/x.txt")
    cfg.data = DataConfig(name="text", paths=[str(ROOT / "configs" / "model" / "*.yaml")])
    validate(cfg, 2)
    cfg.data = DataConfig(name="wiki")
    _fails(cfg, 2, "data.name='wiki'")


def test_validate_unknown_key_and_shared_run_dir(monkeypatch):
    cfg = _cfg()
    cfg.optim.lrr = 1.0  # what `+optim.lrr=1` gives: struct mode does not stop a `+`
    _fails(cfg, 2, "unknown key optim.lrr", "lr")
    # torchrun without --rdzv-id (static rendezvous) gives every job the id "none"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    _fails(Config(run_dir="runs/none"), 2, "--rdzv-id")
    validate(Config(run_dir="/shared/runs/myjob"), 2)
