"""Chat data the tests (and the README's example) make themselves: Hugging Face tokenizer directories with chat
templates of the common kinds, a small corpus of conversations a model can learn, and a small random chat model.

    python tests/chat_data.py OUT_DIR [--n 2000] [--model MODEL_DIR]

writes OUT_DIR/chats.jsonl (N arithmetic conversations) and, with --model, a random Llama (9 heads, 3 KV heads, as
SmolLM2-135M; 1M parameters) with a ChatML tokenizer: an HF directory to try the fine-tuning commands on.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "[INST]", "[/INST]"]

# SmolLM2-Instruct's template (ChatML with a default system prompt)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3 style: bos_token, headers, trimmed content, roles that must alternate, tools as JSON, a namespace
LLAMA3 = ("{{ bos_token }}{% set ns = namespace(last=none) %}"
          "{% if tools %}{{ '<|start_header_id|>system<|end_header_id|>\n\nTools: ' + tools | tojson + '<|eot_id|>' }}"
          "{% endif %}{% for message in messages %}"
          "{% if message['role'] in ('user', 'assistant') and message['role'] == ns.last %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% set ns.last = message['role'] %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
          "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Mistral style: no generation prompt (the answer follows [/INST]), EOS after each answer
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
# ChatML with the assistant's text marked for transformers' return_assistant_tokens_mask
GENERATION = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
              "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOKENS = {"chatml": dict(eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|im_end|>"),
          "llama3": dict(eos_token="<|eot_id|>", bos_token="<|begin_of_text|>"),
          "mistral": dict(eos_token="</s>", bos_token="<s>")}

TEXT = ("The capital of France is Paris. What is twelve plus seven? Twelve plus seven is nineteen. "
        "Hello there, how are you today? I am fine, thank you. Write a function that adds two numbers: "
        "def add(a, b): return a + b. Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 plus minus times is. "
        "Ça va? Très bien — merci! 🙂🎉\n")


def make_tokenizer(directory: str | Path, template: str | None, *, tokens: dict | None = None, kind: str = "bytelevel",
                   template_file: bool = False, vocab_size: int = 600) -> Path:
    """An HF tokenizer directory (tokenizer.json trained here, tokenizer_config.json) with `template` as its chat
    template: in tokenizer_config.json, or in chat_template.jinja with `template_file`. `kind`: bytelevel
    (GPT-2 / Llama 3 style) or metaspace (sentencepiece style, Llama 2 / Mistral)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    tok.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **(tokens or TOKENS["chatml"])}
    if template is not None and template_file:
        (d / "chat_template.jinja").write_text(template)
    elif template is not None:
        config["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return d


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic conversations: the user asks, the assistant answers in a fixed form (learnable by a small
    model); some have a system prompt, some a second turn."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        messages = [{"role": "system", "content": "You add numbers."}] if rng.random() < 0.3 else []
        messages += [{"role": "user", "content": f"What is {a} plus {b}?"},
                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        if rng.random() < 0.3:
            c = rng.randint(0, 99)
            messages += [{"role": "user", "content": f"And plus {c}?"},
                         {"role": "assistant", "content": f"{a + b} plus {c} is {a + b + c}."}]
        out.append({"messages": messages})
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def make_model(directory: str | Path, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (9 heads on 3 KV heads, 4 layers, hidden 144) with a ChatML tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from tokenizers import Tokenizer
    d = make_tokenizer(directory, CHATML)
    vocab = Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=144, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=16, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=SPECIAL.index("<|im_start|>"),
                         eos_token_id=SPECIAL.index("<|im_end|>"))
    LlamaForCausalLM(config).save_pretrained(d)
    return d


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=2000, help="conversations")
    ap.add_argument("--model", type=Path, help="also write a random chat model here")
    args = ap.parse_args()
    print(write_jsonl(args.out / "chats.jsonl", conversations(args.n)))
    if args.model:
        print(make_model(args.model))
