"""Tokenizers: megatron-lite's own sentencepiece BPE, or a Hugging Face `tokenizer.json`, behind one interface.

    tok = load_tokenizer(path)   # a sentencepiece .model, an HF tokenizer.json, or a directory holding either

Every tokenizer has `vocab_size`, `eos_id`, `bos_id` (or None), `encode(text)` (no special tokens),
`decode(ids)`, `encode_document(text)` (what a document becomes in the token stream: BOS when the model's own
convention puts one there, the ids, then EOS) and `save(directory)`, which copies its source files so that
`load_tokenizer(directory)` reads the same tokenizer back. Checkpoints and exports carry their tokenizer this
way. `fingerprint` hashes the model file and the special-token choices: equal fingerprints, equal ids.

The sentencepiece BPE is trained by `train_sentencepiece`, deterministically: the same lines give a
byte-identical model in every process.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from .data.config import DataError

NEWLINE = "<n>"  # control symbol standing for "\n": sentencepiece only sees single lines
MAX_LINE_CHARS = 4096  # longer lines (data blobs) are left out of tokenizer training, not out of the data
SP_THREADS = 2  # stored in the .model file, so it must be a constant for the file to be byte-identical
SP_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"
HF_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json", "config.json")
# the other files of an HF tokenizer, kept with it (data cache, checkpoints, exports) for transformers' sake: the
# chat template, added tokens, the slow tokenizers' vocabularies
HF_EXTRA = ("chat_template.jinja", "chat_template.json", "added_tokens.json", "tokenizer.model", "vocab.json",
            "merges.txt", "vocab.txt")
PROBE = ("def f(x):\n    return x + 1  # añadir ☃ 日本語\nclass A(B):\n\tpass\n\n\nThe quick, brown fox.\n(1, 2)\n"
         "\"quoted\" 123 4567\n#include <x>\n</s> <n> <|endoftext|>\n  indented\r\nwindows line\r\n}\n")
# Special tokens of well-known models, tried in order when no config file names them.
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


class Tokenizer:
    """The interface the data pipeline, checkpoints and sampling use; subclasses set the attributes."""

    kind: str  # "sentencepiece" or "hf"
    vocab_size: int
    eos_id: int
    bos_id: int | None
    add_bos: bool  # does a document start with BOS (the model's convention, e.g. Llama's)?
    files: dict[str, Path]  # name in a saved directory -> source file
    line_cuts: str  # where a text may be cut into parts encoded apart with the same ids: lines | words | none

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_document(self, text: str, *, first: bool = True, last: bool = True) -> list[int]:
        """A document in the token stream; `first`/`last` False for a part that continues one."""
        return self.frame(self.encode(text), first=first, last=last)

    def frame(self, ids: list[int], *, first: bool = True, last: bool = True) -> list[int]:
        """Encoded text as a document (or a part of one) of the token stream."""
        return ([self.bos_id] if first and self.add_bos else []) + ids + ([self.eos_id] if last else [])

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, src in self.files.items():
            if Path(src).resolve() != (directory / name).resolve():
                shutil.copyfile(src, directory / name)

    @cached_property
    def fingerprint(self) -> str:
        """Identity of the ids it gives: its model file and its special-token choices."""
        h = hashlib.sha256(Path(self.files.get(HF_FILE) or self.files[SP_FILE]).read_bytes())
        h.update(json.dumps([self.kind, self.vocab_size, self.eos_id, self.bos_id, self.add_bos]).encode())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece BPE plus explicit newlines.

    sentencepiece treats its input as single lines, so text is split at "\\n", the lines are encoded one by
    one and joined by the id of the <n> control symbol. Control symbols never match input text, so any
    string round-trips: decode(encode(s)) == s (identity normalization and byte fallback do the rest). Lines
    are independent, so encoding a text in pieces cut after a newline gives the same ids as encoding it whole.
    """

    kind = "sentencepiece"
    add_bos = False
    line_cuts = "lines"  # at any line start: lines are encoded independently

    def __init__(self, model_path: str | Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.newline_id = self.sp.piece_to_id(NEWLINE)
        if self.newline_id == self.sp.unk_id():
            raise DataError(f"{model_path} is a sentencepiece model without megatron-lite's {NEWLINE} newline piece: "
                            f"give the model's Hugging Face tokenizer.json (or its directory) as data.tokenizer")
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.files = {SP_FILE: Path(model_path)}

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """One sentencepiece call for all the lines of all the texts (the fast path of data preparation)."""
        lines = [text.split("\n") for text in texts]
        flat = self.sp.encode([line for ls in lines for line in ls], num_threads=1)
        out, k = [], 0
        for ls in lines:
            ids = []
            for line_ids in flat[k:k + len(ls)]:
                ids += line_ids
                ids.append(self.newline_id)
            ids.pop()  # n lines have n - 1 newlines between them
            out.append(ids)
            k += len(ls)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        lines, line = [], []
        for i in map(int, ids):  # also accepts tensors and numpy arrays
            if i == self.newline_id:
                lines.append(line)
                line = []
            else:
                line.append(i)
        lines.append(line)
        return "\n".join(self.sp.decode(line) for line in lines)

    def describe(self) -> str:
        return (f"sentencepiece BPE, {self.vocab_size} pieces; EOS {self.sp.id_to_piece(self.eos_id)!r}={self.eos_id}, "
                f"no BOS at document starts")


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (`tokenizers.Tokenizer.from_file`).

    EOS and BOS are data.eos_token / data.bos_token when given, else what tokenizer_config.json,
    special_tokens_map.json or config.json next to the tokenizer.json name (in that order), else the first
    well-known name in its vocabulary (a bare tokenizer.json: the log says so and which others it has). Whether a
    document starts with BOS is data.bos_token (a token: yes; "": no BOS), else tokenizer_config.json's
    add_bos_token, else what the tokenizer's own post-processor does when asked for special tokens.
    `specials` says which were chosen and why.
    """

    kind = "hf"

    def __init__(self, json_path: str | Path, eos_token: str | None = None, bos_token: str | None = None):
        from tokenizers import Tokenizer as _Tokenizer
        json_path = Path(json_path)
        try:
            self.tk = _Tokenizer.from_file(str(json_path))
        except Exception as e:  # tokenizers raises its own Exception type with the parse error
            raise DataError(f"{json_path} is not a Hugging Face tokenizer.json that `tokenizers` can read "
                            f"({str(e).splitlines()[0]}): give a tokenizer.json, a .model or a model directory") from None
        self.files = {HF_FILE: json_path}
        configs = {}
        for name in HF_CONFIGS:
            if (json_path.parent / name).is_file():
                configs[name] = json.loads((json_path.parent / name).read_text())
                if name != "config.json":  # the model's config is not the tokenizer's: not saved with it
                    self.files[name] = json_path.parent / name
        self.files.update({name: json_path.parent / name for name in HF_EXTRA if (json_path.parent / name).is_file()})
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.chosen = eos_token is not None or bos_token is not None  # by data.eos_token / data.bos_token
        self.eos_id, eos_why = self._choose(json_path, configs, "eos", EOS_NAMES, eos_token)
        if self.eos_id is None:
            raise DataError(f"{json_path}: no EOS token: none is named in {', '.join(HF_CONFIGS)} next to it, and "
                            f"the vocabulary has none of {', '.join(EOS_NAMES)}: set data.eos_token= (or add a "
                            f'tokenizer_config.json with "eos_token" beside it)')
        self.bos_id, bos_why = self._choose(json_path, configs, "bos", BOS_NAMES, bos_token or None)
        self.special_ids = self._special_ids(configs)
        probe = "a"
        added = configs.get("tokenizer_config.json", {}).get("add_bos_token")
        if bos_token is not None:  # "" (no BOS) or a token every document starts with
            self.add_bos, add_why = bool(bos_token), "data.bos_token"
        elif self.bos_id is not None and isinstance(added, bool):
            self.add_bos, add_why = added, "add_bos_token in tokenizer_config.json"
        else:
            self.add_bos = (self.bos_id is not None
                            and self.tk.encode(probe, add_special_tokens=True).ids[:1] == [self.bos_id]
                            and self.tk.encode(probe, add_special_tokens=False).ids[:1] != [self.bos_id])
            add_why = "what its post-processor does"
        bos = "no BOS" if self.bos_id is None else (
            f"BOS {self.tk.id_to_token(self.bos_id)!r}={self.bos_id} ({bos_why}) "
            f"{'at' if self.add_bos else 'not at'} document starts ({add_why})")
        self.specials = f"EOS {self.tk.id_to_token(self.eos_id)!r}={self.eos_id} ({eos_why}); {bos}"

    def _choose(self, json_path: Path, configs: dict, which: str, names: tuple[str, ...], given: str | None
                ) -> tuple[int | None, str]:
        """(id, why) of EOS or BOS: data.{which}_token, else what the config files name, else a well-known name."""
        if given is not None:
            if self.tk.token_to_id(given) is None:
                raise DataError(f"data.{which}_token={given!r} is not a token of {json_path}: give one of its tokens "
                                f"(e.g. {', '.join(repr(n) for n in names if self.tk.token_to_id(n) is not None) or 'none'})")
            return self.tk.token_to_id(given), f"data.{which}_token"
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            value = configs.get(name, {}).get(f"{which}_token")
            if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str) and self.tk.token_to_id(value) is not None:
                return self.tk.token_to_id(value), f"{which}_token in {name}"
        value = configs.get("config.json", {}).get(f"{which}_token_id")
        if isinstance(value, list):  # Llama 3.1 instruct lists several EOS ids; the first is the base model's
            value = value[0] if value else None
        if isinstance(value, int):
            return value, f"{which}_token_id in config.json"
        found = [n for n in names if self.tk.token_to_id(n) is not None]
        if not found:
            return None, ""
        others = f"; it also has {', '.join(found[1:])}" if found[1:] else ""
        return self.tk.token_to_id(found[0]), (f"no file beside {json_path.name} names one: the first well-known "
                                               f"name in its vocabulary{others}; data.{which}_token= chooses")

    def _special_ids(self, configs: dict) -> frozenset[int]:
        """What transformers counts as special (`all_special_ids`): the added tokens marked special, the tokens
        tokenizer_config.json names (bos, eos, unk, pad, additional), and our EOS and BOS."""
        ids = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special} | {self.eos_id}
        ids |= {self.bos_id} if self.bos_id is not None else set()
        named = configs.get("tokenizer_config.json", {})
        for value in [named.get(f"{k}_token") for k in ("bos", "eos", "unk", "pad")] + \
                list(named.get("additional_special_tokens") or []):
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and self.tk.token_to_id(value) is not None:
                ids.add(self.tk.token_to_id(value))
        return frozenset(ids)

    @cached_property
    def line_cuts(self) -> str:
        """"words" when encoding a text in parts cut before the first word of a line (`word_cuts`) gives the ids
        of the whole text, checked on PROBE: true of byte-level BPEs (GPT-2, Llama 3, Qwen, SmolLM: their
        pre-tokenizers split there); "none" for those that prepend "▁" to every text (Llama 2, Mistral)."""
        parts = [p.decode() for p in word_cuts(PROBE.encode(), 1)]
        return "words" if [i for ids in self.encode_batch(parts) for i in ids] == self.encode(PROBE) else "none"

    def save(self, directory: str | Path) -> None:
        """Copies of its files; where no tokenizer_config.json named EOS/BOS, or data.eos_token/bos_token chose
        them, one that names them, so that the copy resolves the same special tokens without the model's
        config.json, the name heuristics or the options."""
        super().save(directory)
        if "tokenizer_config.json" not in self.files or self.chosen:
            src = self.files.get("tokenizer_config.json")
            named = json.loads(Path(src).read_text()) if src else {}
            named["eos_token"] = self.tk.id_to_token(self.eos_id)
            named["bos_token"] = self.tk.id_to_token(self.bos_id) if self.bos_id is not None else None
            if self.chosen:
                named["add_bos_token"] = self.add_bos
            (Path(directory) / "tokenizer_config.json").write_text(json.dumps(named, indent=1))

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """The same ids as `encode_batch`; `encode_batch_fast` (tokenizers >= 0.20) skips the offsets (~15% faster)."""
        encode = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text without the special tokens, as transformers' `decode(ids, skip_special_tokens=True)` (and as
        sentencepiece decodes its control symbols to nothing)."""
        return self.tk.decode([int(i) for i in ids if int(i) not in self.special_ids], skip_special_tokens=False)

    def describe(self) -> str:
        return f"Hugging Face {type(self.tk.model).__name__} tokenizer, {self.vocab_size} tokens; {self.specials}"


_LINE_WORD = re.compile(rb"\n([ \t]*)[^\s]")


def word_cuts(data: bytes, every: int) -> list[bytes]:
    """`data` cut at the first place after every `every` bytes where a line's first word begins: before the
    word, or before the last space or tab of the indentation that leads it (which pre-tokenizers attach to it)."""
    out, start = [], 0
    while start + every < len(data) and (m := _LINE_WORD.search(data, start + every)):
        cut = m.start(1) + max(len(m.group(1)) - 1, 0)
        out.append(data[start:cut])
        start = cut
    out.append(data[start:])
    return out


def tokenizer_files(path: str | Path) -> tuple[str, Path]:
    """(kind, the file load_tokenizer reads) for a .model, a tokenizer.json, or a directory holding one."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name, kind in ((HF_FILE, "hf"), (SP_FILE, "sentencepiece")):  # an HF model dir may hold both
            if (path / name).is_file():
                return kind, path / name
        raise DataError(f"tokenizer directory {path} holds no tokenizer: looked for {HF_FILE} (Hugging Face) and "
                        f"{SP_FILE} (sentencepiece)")
    if not path.is_file():
        raise DataError(f"tokenizer {path} does not exist: give a sentencepiece .model, a Hugging Face "
                        f"tokenizer.json, or a directory holding one")
    return ("hf", path) if path.suffix == ".json" else ("sentencepiece", path)


def load_tokenizer(path: str | Path, eos_token: str | None = None, bos_token: str | None = None) -> Tokenizer:
    """`eos_token` / `bos_token` (data.eos_token / data.bos_token): a Hugging Face tokenizer's EOS, and the token
    starting every document ("" for none), instead of what its files name."""
    kind, file = tokenizer_files(path)
    file = file.resolve()
    if kind != "hf" and (eos_token is not None or bos_token is not None):
        raise DataError(f"data.eos_token / data.bos_token choose a Hugging Face tokenizer's tokens; {path} is a "
                        f"sentencepiece model, whose EOS and BOS are its own: leave them unset")
    read = [file, *(file.parent / name for name in HF_CONFIGS if kind == "hf")]
    stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in read if f.is_file())
    return _load(kind, file, stamp, eos_token, bos_token)


@lru_cache(maxsize=8)  # validation, the cache key and the build all ask; a Llama tokenizer.json is 9 MB
def _load(kind: str, file: Path, stamp: tuple, eos_token: str | None, bos_token: str | None) -> Tokenizer:
    """`stamp`: size and mtime of every file it reads, so that a changed file is read again."""
    return HFTokenizer(file, eos_token, bos_token) if kind == "hf" else SentencePieceTokenizer(file)


def train_sentencepiece(lines: Iterable[str], vocab_size: int) -> bytes:
    """A BPE model trained on exactly `lines`, in order. sentencepiece's own sampling (input_sentence_size > 0)
    is seeded per process and gives each rank a different vocabulary, so the caller samples and this trains
    on all of it."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, character_coverage=1.0, split_digits=True, control_symbols=[NEWLINE],
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=SP_THREADS,
            train_extremely_large_corpus=False, max_sentence_length=4 * MAX_LINE_CHARS,
            normalization_rule_name="identity", remove_extra_whitespaces=False,  # keep code whitespace
            allow_whitespace_only_pieces=True, add_dummy_prefix=False, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"data.vocab_size={vocab_size} does not fit this corpus ({e}): change data.vocab_size "
                        "or give more text") from e
    return model.getvalue()
