"""Fine-tuning a Hugging Face model the way the README says, on a random model of SmolLM2-135M's head counts (9
query heads on 3 KV heads, tied embeddings, bf16 weights, a chat template, generation settings, a pad token):

- the README's fine-tune commands run as written (paths and sizes substituted): training at TP=3 with SP
  and the fine-tuning recipe, evaluate before and after, export, generate;
- the run trains on model.seq_len windows (the model's 8192-position context is only the limit) and its
  config.yaml records the model that ran and the recipe's settings;
- every tokenizer and generation file of the source survives checkpoint -> export: AutoTokenizer's
  apply_chat_template on the export equals the source's; the export is bf16 like the source, readable by others;
- evaluate's loss on a fixed text equals transformers' (TP=1; TP=3 in -m slow), and on chat data too, over the
  assistant's tokens of each conversation;
- a checkpoint without a tokenizer names --tokenizer (generate), takes one (export); an HF directory without one
  names data.tokenizer; the recipe's values and the warnings, without running anything.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cli import ROOT, env
from megatron_lite.config import Config, ConfigError, config_warnings, gpt_config, validate
from megatron_lite.optim import lr_at, warmup_steps

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
WINDOW = 96  # for the README's model.seq_len=1024: a multiple of TP=3
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}" \
       "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"}]


def _smol_like(path: Path, corpus_lines: list[str]) -> Path:
    """A random HF Llama with SmolLM2-135M's head counts and conventions, saved in bf16 with a 1000-piece BPE
    tokenizer.json, a chat template (in chat_template.jinja and tokenizer_config.json), special_tokens_map.json,
    generation_config.json and a pad token. 1152 embedding rows (9 x 128, as SmolLM2's 49152 = 384 x 128): TP=3
    splits the vocabulary padded to a multiple of 128 only when 3 divides it."""
    from megatron_lite.hf_tokenizer import write_hf_tokenizer
    from megatron_lite.tokenizer import train_sentencepiece
    (path.parent / "sp.model").write_bytes(train_sentencepiece(corpus_lines, 1000))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=1152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.generation_config.update(max_new_tokens=64, repetition_penalty=1.1, pad_token_id=0)
    model.to(torch.bfloat16).save_pretrained(path)
    write_hf_tokenizer(path.parent / "sp.model", path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT, "pad_token": "<unk>"}))
    (path / "chat_template.jinja").write_text(CHAT)
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "unk_token": "<unk>", "pad_token": "<unk>"}))
    return path


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("smol")
    (tmp / "my").mkdir()
    for name in ("argparse.py", "textwrap.py", "csv.py"):
        (tmp / "my" / f"{Path(name).stem}.txt").write_text((STDLIB / name).read_text())
    lines = [ln for f in sorted((tmp / "my").iterdir()) for ln in f.read_text().split("\n") if ln]
    return dict(tmp=tmp, hf=_smol_like(tmp / "SmolLM2-135M", lines))


# ---------------------------------------------------------------------------------------------------------
# The README's fine-tune commands, as written
# ---------------------------------------------------------------------------------------------------------


def readme_finetune_commands() -> list[str]:
    """The commands of the README's bash block under "**Fine-tune a Hugging Face model**"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**Fine-tune a Hugging Face model**"):]
    block = section[section.index("```bash\n") + 8:]
    block = block[:block.index("```")]
    commands = [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [c for c in commands if c]


def _as_test(command: str, smol: dict) -> list[str]:
    """`command` with the model, the training script and the sizes substituted, and a private data cache."""
    tmp, args = smol["tmp"], shlex.split(command)
    swap = {"train.py": str(ROOT / "train.py"), "model.seq_len=1024": f"model.seq_len={WINDOW}",
            "train.steps=200": "train.steps=2"}
    args = [swap.get(a, a).replace("/models/SmolLM2-135M", str(smol["hf"])) for a in args]
    head = {"torchrun": [sys.executable, "-m", "torch.distributed.run"], "python": [sys.executable]}[args[0]]
    args = head + args[1:]
    if "train.py" in command:  # small and quiet: 2 steps of 2 sequences, no sample
        args += ["train.global_batch_size=2", "train.micro_batch_size=1", "train.eval_iters=1", "logging.every=1",
                 "sample.max_new_tokens=0"]
    if "train.py" in command or "megatron_lite.evaluate" in command:
        args += [f"data.cache_dir={tmp}/cache", "data.workers=1"]
    if "megatron_lite.evaluate" in command:
        args += ["--json"]
    if "megatron_lite.generate" in command:
        args += ["--max-new-tokens", "8"]
    return args


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env={**env(), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, f"{shlex.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def readme_run(smol) -> dict:
    commands = readme_finetune_commands()
    assert [c.split()[0:3] for c in commands] == [
        ["torchrun", "--standalone", "--nproc_per_node=3"], ["python", "-m", "megatron_lite.evaluate"],
        ["python", "-m", "megatron_lite.evaluate"], ["python", "-m", "megatron_lite.export"],
        ["python", "-m", "megatron_lite.generate"]], commands
    out = [_run(_as_test(c, smol), smol["tmp"]) for c in commands]
    run = smol["tmp"] / "runs" / "smol-ft"
    return dict(out=out, run=run, step=run / "checkpoints" / "step_0000002", export=run / "hf", hf=smol["hf"],
                log=(run / "train.log").read_text(), config=OmegaConf.load(run / "config.yaml"))


def test_readme_finetune_commands_run_on_a_smollm2_shaped_model(readme_run):
    train, before, after, exported, generated = readme_run["out"]
    log, cfg, hf = readme_run["log"], readme_run["config"], readme_run["hf"]
    assert f"initialized from the Hugging Face model {hf} (LlamaForCausalLM)" in log, log
    assert "TP=3" in log.splitlines()[0] and "DP=1" in log.splitlines()[0], log
    assert "warning" not in log, log  # the recipe's rate and warmup are fine for a pretrained model
    # the training window is model.seq_len, the model's 8192 positions only its limit; config.yaml says so
    meta = json.loads((readme_run["step"] / "meta.json").read_text())
    assert (meta["model"]["seq_len"], meta["model"]["max_seq_len"], meta["model"]["sequence_parallel"]) == \
        (WINDOW, 8192, True)
    m = cfg.model
    assert (m.name, m.seq_len, m.max_seq_len, m.num_heads, m.num_kv_heads, m.hidden_size, m.norm, m.tie_embeddings) == \
        (f"LlamaForCausalLM from {hf}", WINDOW, 8192, 9, 3, 72, "rmsnorm", True)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_fraction, cfg.parallel.tp) == (2e-5, 2e-6, 0.03, 3)
    # evaluate: the same validation tokens before and after, both losses finite
    b, a = json.loads(before.stdout.splitlines()[-1]), json.loads(after.stdout.splitlines()[-1])
    assert b["tokens"] == a["tokens"] > 0 and b["window"] == a["window"] == WINDOW, (b, a)
    assert np.isfinite([b["loss"], a["loss"]]).all() and abs(b["perplexity"] - np.exp(b["loss"])) < 1e-6 * b["perplexity"]
    assert "(LlamaForCausalLM, bfloat16)" in exported.stdout, exported.stdout
    assert "step_0000002 (TP=1)\nOnce upon a time" in generated.stdout, generated.stdout
    print(f"\nevaluate before {b['loss']:.4f}, after {a['loss']:.4f} ({b['tokens']} tokens)")


def test_export_keeps_the_tokenizer_chat_template_and_generation_files_in_the_source_dtype(readme_run):
    hf, out, step = readme_run["hf"], readme_run["export"], readme_run["step"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        assert (step / name).read_bytes() == (hf / name).read_bytes() == (out / name).read_bytes(), name
    assert (out / "generation_config.json").read_bytes() == (hf / "generation_config.json").read_bytes()
    config, source = json.loads((out / "config.json").read_text()), json.loads((hf / "config.json").read_text())
    assert source["dtype"] == "bfloat16" and config == {**source, "torch_dtype": "bfloat16"}, (config, source)
    assert config["pad_token_id"] == 0
    theirs, mine = transformers.AutoTokenizer.from_pretrained(hf), transformers.AutoTokenizer.from_pretrained(out)
    for kw in (dict(tokenize=False), dict(tokenize=True), dict(tokenize=False, add_generation_prompt=True)):
        rendered = mine.apply_chat_template(MESSAGES, **kw)
        assert rendered == theirs.apply_chat_template(MESSAGES, **kw) and rendered, kw
    assert mine.pad_token_id == theirs.pad_token_id == 0
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()) and model.dtype == torch.bfloat16, info
    assert model.generation_config.repetition_penalty == 1.1
    for f in out.iterdir():  # readable by others, as HF downloads are (umask 022)
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, (f, oct(f.stat().st_mode))
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


@pytest.fixture
def bare_step(readme_run, tmp_path) -> Path:
    """A copy of the run's checkpoint without its tokenizer files."""
    bare = tmp_path / "step_0000002"
    shutil.copytree(readme_run["step"], bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json",
                                                                            "chat_template.jinja"))
    return bare


def test_a_checkpoint_without_a_tokenizer_names_the_option(readme_run, bare_step):
    from megatron_lite.checkpoint import checkpoint_tokenizer
    from megatron_lite.data import DataError
    with pytest.raises(DataError) as e:
        checkpoint_tokenizer(bare_step, None, "--tokenizer PATH")
    assert f"{bare_step} has no tokenizer: name one with --tokenizer PATH" in str(e.value) and "\n" not in str(e.value)
    tok = checkpoint_tokenizer(bare_step, readme_run["hf"], "--tokenizer PATH")
    assert tok.files["tokenizer.json"] == readme_run["hf"] / "tokenizer.json"


@pytest.mark.slow  # the CLI wiring of what the test above checks
def test_generate_names_and_export_takes_the_tokenizer_option(readme_run, bare_step, tmp_path):
    base = [sys.executable, "-m"]
    commands = {"generate": base + ["megatron_lite.generate", str(bare_step), "--max-new-tokens", "2"],
                "export": base + ["megatron_lite.export", str(bare_step), str(tmp_path / "out"), "--tokenizer",
                                  str(readme_run["hf"])]}
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(commands, pool.map(lambda a: subprocess.run(a, cwd=tmp_path, env={**env(), "PYTHONPATH": str(ROOT)},
                                                                    capture_output=True, text=True, timeout=120),
                                          commands.values())))
    gen = done["generate"]
    assert gen.returncode == 2 and "has no tokenizer: name one with --tokenizer PATH" in gen.stderr, gen.stderr
    assert len(gen.stderr.strip().splitlines()) == 1, gen.stderr
    assert done["export"].returncode == 0, done["export"].stderr
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (readme_run["hf"] / "tokenizer.json").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# evaluate against transformers
# ---------------------------------------------------------------------------------------------------------


def _cache_streams(cache: Path) -> list[np.ndarray]:
    (built,) = [p for p in cache.iterdir() if (p / "DONE").is_file()]
    dtype = json.loads((built / "meta.json").read_text())["dtype"]
    return [np.fromfile(built / name, dtype=dtype).astype(np.int64) for name in ("train.bin", "val.bin")]


def _transformers_loss(hf_dir: Path, streams: list[np.ndarray], window: int) -> tuple[float, int]:
    """transformers' mean token loss over the windows evaluate cuts (every token predicted once)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens in streams:
            for start in range(0, len(tokens) - 1, window):
                chunk = torch.from_numpy(tokens[start:start + window + 1])
                logits = model(chunk[None, :-1]).logits[0]
                total += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").double().item()
                count += len(chunk) - 1
    return total / count, count


@pytest.mark.parametrize("nproc", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_evaluate_loss_on_a_text_equals_transformers(smol, tmp_path, nproc):
    text = (STDLIB / "textwrap.py").read_text()[:6000]
    (tmp_path / "fixed.txt").write_text(text)
    head = [sys.executable, "-m"] + (["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
                                     if nproc > 1 else [])
    proc = _run(head + ["megatron_lite.evaluate", str(smol["hf"]), "data=text", f"data.paths=[{tmp_path}/fixed.txt]",
                        f"data.cache_dir={tmp_path}/cache", "model.seq_len=150", "train.micro_batch_size=2",
                        f"parallel.tp={nproc}", "--split", "all", "--json"], tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    streams = _cache_streams(tmp_path / "cache")
    tok = transformers.AutoTokenizer.from_pretrained(smol["hf"])
    assert sorted(np.concatenate(streams).tolist()) == sorted(tok(text)["input_ids"] + [tok.eos_token_id])
    ref, count = _transformers_loss(smol["hf"], streams, 150)
    assert result["tokens"] == count and count > 3 * 150, (result, count)  # several windows, the last one short
    assert abs(result["loss"] - ref) / ref < 1e-6, (result["loss"], ref)
    print(f"\nevaluate (TP={nproc}): loss {result['loss']:.7f}, transformers {ref:.7f}, {count} tokens")


def test_evaluate_on_chat_data_counts_the_assistant_tokens_as_transformers_does(smol, tmp_path):
    """The SmolLM2-shaped model and its chat template on 40 conversations, packed into 384-token windows: the loss
    equals transformers' over each conversation alone, counting the targets the cache flags (the assistant's)."""
    from chat_data import conversations, write_jsonl
    from megatron_lite.data.chat_prepare import LOSS, START
    model_dir = smol["hf"]
    write_jsonl(tmp_path / "chats.jsonl", conversations(40, seed=3))
    proc = _run([sys.executable, "-m", "megatron_lite.evaluate", str(model_dir), "data=chat",
                 f"data.paths=[{tmp_path}/chats.jsonl]", f"data.cache_dir={tmp_path}/cache", "model.seq_len=384",
                 "--split", "all", "--json"], tmp_path)
    result = json.loads(proc.stdout)
    (built,) = [p for p in (tmp_path / "cache").iterdir() if (p / "DONE").is_file()]
    dtype = json.loads((built / "meta.json").read_text())["dtype"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for split in ("train", "val"):
        tokens = np.fromfile(built / f"{split}.bin", dtype=dtype).astype(np.int64)
        flags = np.fromfile(built / f"{split}.flags.bin", dtype=np.uint8)
        starts = np.flatnonzero(flags & START).tolist() + [len(tokens)]
        for s, e in zip(starts, starts[1:]):
            chunk = torch.from_numpy(tokens[s:e])
            counted = torch.from_numpy((flags[s + 1:e] & LOSS) > 0)
            with torch.no_grad():
                losses = torch.nn.functional.cross_entropy(model(chunk[None, :-1]).logits[0], chunk[1:], reduction="none")
            total += losses[counted].double().sum().item()
            count += int(counted.sum())
    assert result["tokens"] == count > 0 and result["window"] == 384, (result, count)
    assert abs(result["loss"] - total / count) / (total / count) < 1e-6, (result["loss"], total / count)


# ---------------------------------------------------------------------------------------------------------
# config checks without running anything
# ---------------------------------------------------------------------------------------------------------


def _compose(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def _hf_dir(path: Path, tokenizer: bool = True, **config) -> Path:
    """An HF Llama directory validation accepts (it reads no weight: an empty file does)."""
    from tokenizers import Tokenizer, models
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, tie_word_embeddings=True), **config}))
    (path / "model.safetensors").write_bytes(b"")
    if tokenizer:
        Tokenizer(models.BPE(vocab={"a": 0, "</s>": 1}, merges=[])).save(str(path / "tokenizer.json"))
    return path


def test_an_hf_model_trains_on_model_seq_len_at_tp3_sp_and_config_records_the_model(tmp_path):
    hf = _hf_dir(tmp_path / "smol")
    cfg = _compose(f"checkpoint.load={hf}", "parallel.tp=3", "model.seq_len=129", "train.global_batch_size=3",
                   "train.micro_batch_size=1")
    assert cfg.parallel.sp
    validate(cfg, 3)  # before: "model.seq_len=8192 is not divisible by parallel.tp=3"
    g = gpt_config(cfg)
    assert (g.seq_len, g.max_seq_len, g.num_heads, g.num_kv_heads, g.sequence_parallel) == (129, 8192, 9, 3, True)
    m = cfg.model  # what the run's config.yaml records: the model that runs, not the tiny preset
    assert (m.name, m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.norm, m.seq_len, m.max_seq_len) == \
        (f"LlamaForCausalLM from {hf}", 30, 576, 9, 3, "rmsnorm", 129, 8192)
    with pytest.raises(ConfigError, match=r"model.seq_len=8193 exceeds the context .*use model.seq_len<=8192"):
        validate(_compose(f"checkpoint.load={hf}", "model.seq_len=8193"), 1)
    with pytest.raises(ConfigError, match=r"model.seq_len=130 is not divisible by parallel.tp=3"):
        validate(_compose(f"checkpoint.load={hf}", "parallel.tp=3", "model.seq_len=130",
                          "train.global_batch_size=3", "train.micro_batch_size=1"), 3)
    mistral = _hf_dir(tmp_path / "mistral", architectures=["MistralForCausalLM"], model_type="mistral",
                      sliding_window=4096)
    with pytest.raises(ConfigError) as e:
        validate(_compose(f"checkpoint.load={mistral}", "model.seq_len=4200"), 1)
    assert "sliding_window=4096" in str(e.value) and "model.seq_len<=4096" in str(e.value)


def test_an_hf_model_without_a_tokenizer_names_data_tokenizer(tmp_path):
    hf = _hf_dir(tmp_path / "bare", tokenizer=False)
    with pytest.raises(ConfigError) as e:
        validate(_compose(f"checkpoint.load={hf}"), 1)
    msg = str(e.value)
    assert "holds no tokenizer" in msg and "name one with data.tokenizer=PATH" in msg and "\n" not in msg, msg
    validate(_compose(f"checkpoint.load={hf}", f"data.tokenizer={_hf_dir(tmp_path / 'tok')}/tokenizer.json"), 1)


def test_finetune_recipe_values_and_warnings(tmp_path):
    cfg = _compose("+recipe=finetune", "train.steps=1000")
    o = cfg.optim
    assert (o.lr, o.min_lr, o.warmup_fraction, o.weight_decay, o.beta2) == (2e-5, 2e-6, 0.03, 0.0, 0.999)
    assert warmup_steps(o, 1000) == 30 and lr_at(29, o, 1000) == 2e-5 and lr_at(0, o, 1000) == 2e-5 / 30
    assert lr_at(999, o, 1000) == pytest.approx(2e-6, rel=1e-4)  # cosine to 10%
    assert _compose("+recipe=finetune", "optim.lr=1e-4").optim.min_lr == pytest.approx(1e-5)  # lr stays settable
    assert config_warnings(cfg) == []
    short = _compose("train.steps=10")  # warmup_steps=20 by default
    (line,) = config_warnings(short)
    assert line.startswith("warning: the warmup (20 steps, optim.warmup_steps) is not shorter than the run "
                           "(train.steps=10)") and "50% of optim.lr=0.003" in line and "\n" not in line, line
    hf = _hf_dir(tmp_path / "hf")
    (line,) = config_warnings(_compose(f"checkpoint.load={hf}"))  # the pretraining default on a pretrained model
    assert "optim.lr=0.003 is a pretraining learning rate" in line and "+recipe=finetune" in line
    assert config_warnings(_compose(f"checkpoint.load={hf}", "+recipe=finetune")) == []
    assert not any("warmup" in w for w in config_warnings(_compose("+recipe=finetune", "train.steps=10")))
