"""TEMPORARY shim until the data branch lands (it owns this module)."""
from pathlib import Path

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class _HF:
    def __init__(self, d):
        from tokenizers import Tokenizer
        import json
        self.tok = Tokenizer.from_file(str(Path(d) / "tokenizer.json"))
        cfg = json.loads((Path(d) / "config.json").read_text()) if (Path(d) / "config.json").is_file() else {}
        self.bos_id, self.eos_id = cfg.get("bos_token_id"), cfg.get("eos_token_id")

    def encode_prompt(self, text):
        return self.tok.encode(text).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)


class _SP:
    def __init__(self, f):
        from .data import Tokenizer
        self.t = Tokenizer(f)
        self.bos_id, self.eos_id = self.t.bos_id, self.t.eos_id

    def encode_prompt(self, text):
        return self.t.encode(text)

    def decode(self, ids):
        return self.t.decode(ids)


def load_tokenizer(path):
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return _HF(path)
    return _SP(path / "tokenizer.model")
