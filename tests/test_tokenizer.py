"""Tokenizers behind one interface: megatron-lite's sentencepiece BPE and real Hugging Face tokenizer.json files
(built here with the `tokenizers` library: nothing is downloaded), loaded from a file or a model directory."""
import json
import sysconfig
from pathlib import Path

import pytest

from megatron_lite.data import DataError
from megatron_lite.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = [(STDLIB / f).read_text() for f in ("textwrap.py", "json/decoder.py", "string.py", "bisect.py")]
SNIPPET = "def f(x):\n\tif x:  # tab, two spaces\n        return 'héllo ☃ 日本語 ⏎ <n> </s>'\n\n\r\n  \n"


def hf_bpe(path: Path, specials: list[str], bos: str | None = None) -> Path:
    """A byte-level BPE (GPT-2 style) trained on TEXTS; with `bos`, a post-processor that adds it (Llama style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))])
    path.parent.mkdir(parents=True, exist_ok=True)
    tk.save(str(path))
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(train_sentencepiece([ln for t in TEXTS for ln in t.split("\n") if ln], 512))
    return path


@pytest.fixture(scope="module")
def gpt2_json(tmp_path_factory) -> Path:
    return hf_bpe(tmp_path_factory.mktemp("gpt2") / "tokenizer.json", ["<|endoftext|>"])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """An HF model directory: tokenizer.json whose post-processor adds <s>, and the configs naming EOS/BOS
    (config.json names other ids, which tokenizer_config.json overrides)."""
    d = tmp_path_factory.mktemp("llama")
    hf_bpe(d / "tokenizer.json", ["<s>", "</s>", "<unk>"], bos="<s>")
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    (d / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 2}))
    return d


def test_sentencepiece_round_trip_and_documents(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 512 and tok.add_bos is False
    for text in (SNIPPET, TEXTS[0], "", "\n", "a\n\nb"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.eos_id not in ids
        assert tok.encode_document(text) == ids + [tok.eos_id]
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    # lines are encoded independently: cutting a text after a newline does not change its ids
    cut = TEXTS[0].index("\n", 1000) + 1
    assert tok.encode(TEXTS[0]) == tok.encode(TEXTS[0][:cut]) + tok.encode(TEXTS[0][cut:])


def test_hf_tokenizer_json_file(gpt2_json):
    tok = load_tokenizer(gpt2_json)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 600
    assert tok.eos_id == tok.tk.token_to_id("<|endoftext|>") and tok.bos_id is None and tok.add_bos is False
    ids = tok.encode(SNIPPET)
    assert tok.decode(ids) == SNIPPET and tok.eos_id not in ids  # byte-level: any text round-trips
    assert tok.encode_document(SNIPPET) == ids + [tok.eos_id]
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_hf_model_directory_follows_the_models_bos_convention(llama_dir):
    tok = load_tokenizer(llama_dir)
    bos, eos = tok.tk.token_to_id("<s>"), tok.tk.token_to_id("</s>")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (bos, eos, True)  # tokenizer_config.json wins over config.json
    ids = tok.encode("def f(): pass")
    assert bos not in ids and tok.decode(ids) == "def f(): pass"
    assert tok.encode_document("def f(): pass") == [bos] + ids + [eos]
    assert tok.encode_document("x", first=False, last=False) == tok.encode("x")


def test_hf_special_tokens_from_config_json(tmp_path):
    hf_bpe(tmp_path / "tokenizer.json", ["<a>", "<b>"])
    with pytest.raises(DataError, match=r"no EOS token.*tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [1, 0], "bos_token_id": 0}))
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.bos_id, tok.add_bos) == (1, 0, False)  # the first of a list of EOS ids


@pytest.mark.parametrize("which", ["sp_model", "gpt2_json", "llama_dir"])
def test_save_then_load_gives_the_same_tokenizer(which, request, tmp_path):
    src = load_tokenizer(request.getfixturevalue(which))
    src.save(tmp_path / "ckpt")
    copy = load_tokenizer(tmp_path / "ckpt")
    assert type(copy) is type(src) and copy.fingerprint == src.fingerprint
    assert (copy.vocab_size, copy.eos_id, copy.bos_id, copy.add_bos) == (src.vocab_size, src.eos_id, src.bos_id,
                                                                          src.add_bos)
    assert copy.encode_document(SNIPPET) == src.encode_document(SNIPPET)
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert names == ({"tokenizer.model"} if which == "sp_model" else {"tokenizer.json", "tokenizer_config.json"})


def test_fingerprint_tells_tokenizers_apart(sp_model, gpt2_json, llama_dir):
    prints = {load_tokenizer(p).fingerprint for p in (sp_model, gpt2_json, llama_dir)}
    assert len(prints) == 3 and load_tokenizer(sp_model).fingerprint == load_tokenizer(sp_model.parent).fingerprint


def test_bad_tokenizer_paths_say_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path} holds no tokenizer: looked for tokenizer.json .* tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json is not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
    import sentencepiece as spm  # a sentencepiece model of someone else's: no <n> piece
    plain = tmp_path / "plain.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS[0].split("\n")), model_prefix=str(plain.with_suffix("")),
                                   vocab_size=300, minloglevel=2)
    with pytest.raises(DataError, match="without megatron-lite's <n> newline piece"):
        load_tokenizer(plain)
