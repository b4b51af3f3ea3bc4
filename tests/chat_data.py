"""Chat data the tests (and the README's example) make themselves: Hugging Face tokenizer directories with chat
templates of the common kinds, and a small corpus of conversations a model can learn.

    python tests/chat_data.py OUT_DIR [N]    # OUT_DIR/chats.jsonl: N (default 2000) arithmetic conversations
"""
from __future__ import annotations

import json
import random
import sys
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


if __name__ == "__main__":
    out = Path(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    print(write_jsonl(out / "chats.jsonl", conversations(n)))
