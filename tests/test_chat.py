"""Chat and instruction data (data/chat_template.py, chat.py, chat_prepare.py, packing.py):

- conversations render and tokenize exactly as transformers' `apply_chat_template` (ChatML, Llama-3 and
  Mistral-style templates, byte-level and sentencepiece-style tokenizers, a template in chat_template.jinja),
  and the loss mask equals transformers' `assistant_masks` where the template marks the assistant's text;
- the mask by hand on a known conversation, and for prompt/completion rows (HF and sentencepiece tokenizers);
- preparation: JSONL and Parquet give the same cache, the token counts of each kind, conversations without an
  assistant turn left out and counted, validation never empty, bad rows and templates as one-line errors;
- packing: best-fit decreasing against a brute-force reference, windows (targets, positions, document ids) by
  hand, padding, cut conversations, epochs; text windows with document masks.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chat_data import CHATML, GENERATION, LLAMA3, MISTRAL, TEXT, TOKENS, conversations, make_tokenizer, write_jsonl
from megatron_lite.data import DataConfig, DataError, prepare_corpus
from megatron_lite.data.chat import encode_chat, encode_prompt_completion, token_offsets
from megatron_lite.data.chat_template import ChatTemplate
from megatron_lite.data.chat_prepare import LOSS, START
from megatron_lite.data.packing import PackedWindows, best_fit_decreasing, document_metadata
from megatron_lite.tokenizer import load_tokenizer, train_sentencepiece

HELLO = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
         {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
CONVERSATIONS = [
    HELLO,
    [{"role": "system", "content": "Be brief."}, *HELLO],
    [{"role": "user", "content": "  Ça va? 🙂\n\nnew line  "}, {"role": "assistant", "content": " Très bien — merci! 🎉 "}],
    [{"role": "user", "content": "What is 12 plus 7?"}, {"role": "assistant", "content": "19", "reasoning": None}],
]
TEMPLATES = {"chatml": (CHATML, "bytelevel", False), "llama3": (LLAMA3, "bytelevel", False),
             "mistral": (MISTRAL, "metaspace", False), "generation": (GENERATION, "bytelevel", True)}


@pytest.fixture(scope="module")
def tokdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: make_tokenizer(root / name, template, tokens=TOKENS.get(name, TOKENS["chatml"]), kind=kind,
                                 template_file=as_file)
            for name, (template, kind, as_file) in TEMPLATES.items()}


def _runs(ids, counted, tok) -> list[str]:
    """The text of each run of counted tokens, special tokens included."""
    out, i = [], 0
    while i < len(ids):
        if counted[i]:
            j = i
            while j < len(ids) and counted[j]:
                j += 1
            out.append(tok.tk.decode(ids[i:j], skip_special_tokens=False))
            i = j
        else:
            i += 1
    return out


def test_conversations_render_and_tokenize_as_transformers(tokdirs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int", "b": "int"}}}]
    for name, d in tokdirs.items():
        hf, tok, template = AutoTokenizer.from_pretrained(d), load_tokenizer(d), ChatTemplate.of_tokenizer(d)
        for messages in CONVERSATIONS:
            for prompt in (False, True):
                assert template.render(messages, add_generation_prompt=prompt) == hf.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=prompt), (name, messages, prompt)
            ids, counted = encode_chat(tok, template, messages)
            assert ids == hf.apply_chat_template(messages, return_dict=False), (name, messages)
            assert sum(counted) > 0
            if name == "generation":  # the template marks the assistant's text: transformers' own mask
                assert [int(c) for c in counted] == hf.apply_chat_template(
                    messages, return_assistant_tokens_mask=True)["assistant_masks"]
        if name == "llama3":
            ids, _ = encode_chat(load_tokenizer(d), template, HELLO, tools)
            assert ids == hf.apply_chat_template(HELLO, tools=tools, return_dict=False)


def test_assistant_mask_by_hand(tokdirs):
    """The counted tokens of a known conversation are exactly each answer and its end-of-turn token."""
    expected = {"chatml": ["Hi there<|im_end|>", "Paris.<|im_end|>"], "llama3": ["Hi there<|eot_id|>", "Paris.<|eot_id|>"],
                "mistral": ["Hi there</s>", "Paris.</s>"], "generation": ["Hi there<|im_end|>", "Paris.<|im_end|>"]}
    prompt_ends = {"chatml": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                   "mistral": "[/INST]", "generation": "<|im_start|>assistant\n"}
    for name, d in tokdirs.items():
        tok, template = load_tokenizer(d), ChatTemplate.of_tokenizer(d)
        ids, counted = encode_chat(tok, template, HELLO)
        assert _runs(ids, counted, tok) == expected[name], name
        firsts = [i for i in range(len(ids)) if counted[i] and not counted[i - 1]]
        for i in firsts:  # what precedes an answer is the generation prompt
            assert tok.tk.decode(ids[:i], skip_special_tokens=False).endswith(prompt_ends[name]), name


def test_prompt_completion_by_hand(tokdirs, tmp_path):
    tok = load_tokenizer(tokdirs["chatml"])
    prompt, completion = "What is 12 plus 7?", " 12 plus 7 is 19."
    ids, counted = encode_prompt_completion(tok, prompt, completion)
    assert ids == tok.encode(prompt + completion) + [tok.eos_id]
    assert _runs(ids, counted, tok) == [completion + "<|im_end|>"]
    # our sentencepiece BPE (lines encoded one by one): offsets give the ids `encode` gives, multi-line and non-ASCII
    (tmp_path / "tokenizer.model").write_bytes(train_sentencepiece(TEXT.split(". ") * 10, 400))
    sp = load_tokenizer(tmp_path / "tokenizer.model")
    text = "Q: Ça va?\n\n  x = 1\t🙂\nA: Très bien — 19."
    ids, offsets = token_offsets(sp, text)
    assert ids == sp.encode(text) and len(offsets) == len(ids)
    ids, counted = encode_prompt_completion(sp, "Q: Ça va?\n", "A: Très bien — 19.")
    assert sp.decode([i for i, c in zip(ids, counted) if c]) == "A: Très bien — 19." and counted[-1]


def test_template_errors_are_one_line(tokdirs, tmp_path):
    tok = load_tokenizer(tokdirs["llama3"])
    template = ChatTemplate.of_tokenizer(tokdirs["llama3"])
    from megatron_lite.data.chat import encode_record
    with pytest.raises(DataError, match="a.jsonl:3: the chat template refuses this conversation: Conversation roles must"):
        encode_record(tok, template, ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], None),
                      "chat", "a.jsonl:3")
    # a template that rewrites earlier turns (here: drops all but the last answer) has no prefix to find answers by
    rewriting = ChatTemplate("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.content }}|"
                             "{% endif %}{% endfor %}")
    with pytest.raises(DataError, match="generation"):
        rewriting.assistant_spans(HELLO)
    make_tokenizer(tmp_path / "plain", None)
    with pytest.raises(DataError, match="has none"):
        ChatTemplate.of_tokenizer(tmp_path / "plain")


def _cfg(tmp_path, paths, tokenizer, **kw) -> DataConfig:
    return DataConfig(name="text", paths=[str(p) for p in paths], tokenizer=str(tokenizer), workers=1,
                      cache_dir=str(tmp_path / "cache"), **{"format": "chat", **kw})


def test_prepare_chat_corpus(tokdirs, tmp_path):
    """JSONL and Parquet give the same tokens and flags; the counts of each kind are the sums of the masks."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = conversations(60, seed=1) + [{"messages": [{"role": "user", "content": "no answer"}]}]
    jsonl = write_jsonl(tmp_path / "chats.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet", row_group_size=16)
    lines = []
    a = prepare_corpus(_cfg(tmp_path, [jsonl], tokdirs["chatml"], val_fraction=0.2), log=lines.append)
    b = prepare_corpus(_cfg(tmp_path, [tmp_path / "chats.parquet"], tokdirs["chatml"], val_fraction=0.2),
                       log=lambda _: None)
    assert a.path != b.path and a.meta["corpus"] == b.meta["corpus"]
    for split in ("train", "val"):
        assert np.array_equal(getattr(a, f"{split}_tokens")(), getattr(b, f"{split}_tokens")())
        assert np.array_equal(a.flags(split), b.flags(split))
    tok, template = load_tokenizer(tokdirs["chatml"]), ChatTemplate.of_tokenizer(tokdirs["chatml"])
    encoded = [encode_chat(tok, template, r["messages"]) for r in rows[:-1]]
    c, m = a.meta["chat"], a.meta
    assert c["empty"] == 1 and c["train_documents"] + c["val_documents"] == 60 and c["val_documents"] > 0
    assert m["train_tokens"] + m["val_tokens"] == sum(len(ids) for ids, _ in encoded)
    assert c["train_loss_tokens"] + c["val_loss_tokens"] == sum(sum(k) for _, k in encoded)
    flags = np.concatenate([a.flags("train"), a.flags("val")])
    assert int(np.count_nonzero(flags & START)) == 60
    assert f"{c['train_loss_tokens']:,} assistant tokens" in "\n".join(lines) and "1 without assistant" in lines[-1]
    assert f"{c['val_loss_tokens']:,} assistant tokens" in a.summary()
    a.verify_checksums()


def test_prepare_edge_cases(tokdirs, tmp_path):
    """Validation is never empty; bad rows, files and settings fail with one line naming them."""
    rows = conversations(3, seed=2)
    corpus = prepare_corpus(_cfg(tmp_path, [write_jsonl(tmp_path / "few.jsonl", rows)], tokdirs["chatml"],
                                 val_fraction=0.01), log=lambda _: None)
    assert corpus.meta["chat"]["val_documents"] == 1 and corpus.meta["chat"]["moved_to_val"]
    d = tokdirs["chatml"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        prepare_corpus(_cfg(tmp_path, [bad], d), log=lambda _: None)
    bad.write_text(json.dumps({"conversation": []}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: no 'messages' field \(it has: conversation\)"):
        prepare_corpus(_cfg(tmp_path, [bad], d), log=lambda _: None)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(DataError, match="notes.txt: data.format=chat reads JSONL"):
        prepare_corpus(_cfg(tmp_path, [text], d), log=lambda _: None)
    with pytest.raises(DataError, match="needs the tokenizer"):
        prepare_corpus(DataConfig(name="text", paths=[str(bad)], format="chat"), log=lambda _: None)
    with pytest.raises(DataError, match="data.format='dialog' must be"):
        prepare_corpus(_cfg(tmp_path, [bad], d, format="dialog"), log=lambda _: None)


def test_prompt_completion_corpus(tokdirs, tmp_path):
    rows = [{"prompt": f"What is {a} plus 1?", "completion": f" {a + 1}."} for a in range(20)]
    corpus = prepare_corpus(_cfg(tmp_path, [write_jsonl(tmp_path / "pc.jsonl", rows)], tokdirs["chatml"],
                                 format="prompt_completion"), log=lambda _: None)
    tok = load_tokenizer(tokdirs["chatml"])
    expected = [encode_prompt_completion(tok, r["prompt"], r["completion"]) for r in rows]
    c = corpus.meta["chat"]
    assert c["train_loss_tokens"] + c["val_loss_tokens"] == sum(sum(k) for _, k in expected)
    assert "completion tokens" in corpus.summary()


# ---------------------------------------------------------------- packing


def _reference_best_fit(sizes, capacity):
    """Best-fit decreasing, the obvious quadratic way."""
    bins, rooms = [], []
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        fits = [b for b in range(len(bins)) if rooms[b] >= sizes[item]]
        if fits:
            b = min(fits, key=lambda b: (rooms[b], b))  # the fullest; the oldest of equals
        else:
            b = len(bins)
            bins.append([])
            rooms.append(capacity)
        bins[b].append(item)
        rooms[b] -= sizes[item]
    return bins


def test_best_fit_decreasing():
    rng = np.random.default_rng(0)
    for capacity in (7, 64):
        sizes = rng.integers(1, capacity + 1, size=300)
        bins = best_fit_decreasing(sizes, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
        assert all(sizes[b].sum() <= capacity for b in bins)
        assert bins == _reference_best_fit(sizes.tolist(), capacity)


def _stream(convs):
    """tokens and flags of conversations given as lists of (token, counted)."""
    tokens = np.array([t for conv in convs for t, _ in conv], dtype=np.uint16)
    flags = np.array([LOSS * c + START * (k == 0) for conv in convs for k, (_, c) in enumerate(conv)], dtype=np.uint8)
    return tokens, flags


def test_packed_windows_by_hand():
    # A: 4 tokens (the last two counted), B: 3 (the last counted), C: 8 (> seq_len + 1 = 6: cut), D: 7 (cut, and
    # nothing counted in its first 6 tokens: left out)
    A = [(11, 0), (12, 0), (13, 1), (14, 1)]
    B = [(21, 0), (22, 0), (23, 1)]
    C = [(31, 0), (32, 1), (33, 0), (34, 1), (35, 1), (36, 1), (37, 1), (38, 1)]
    D = [(41, 0)] * 6 + [(47, 1)]
    tokens, flags = _stream([A, B, C, D])
    w = PackedWindows(tokens, flags, 5, seed=0, sampling="epoch", packing=True, pad_id=0)
    assert w.stats["cut"] == 1 and w.stats["left_out"] == 1 and w.stats["conversations"] == 3
    assert w.bins == [[2], [0], [1]]  # sizes A 4, B 3, C 5 (of the kept): C, then A, then B (3 > A's room of 1)
    C_, A_, B_ = ([a.tolist() for a in w.window(k)] for k in range(3))  # tokens, targets, positions, document ids
    # C fills a window: its first 5 tokens, each with the next one as target where counted (the 6th counts)
    assert C_ == [[31, 32, 33, 34, 35], [32, -100, 34, 35, 36], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    # A then padding: A's last token has no target, the padding is a document of its own
    assert A_ == [[11, 12, 13, 14, 0], [-100, 13, 14, -100, -100], [0, 1, 2, 3, 0], [0, 0, 0, 0, 1]]
    assert B_ == [[21, 22, 23, 0, 0], [-100, 23, -100, -100, -100], [0, 1, 2, 0, 1], [0, 0, 0, 1, 1]]
    assert "1 longer than 6 tokens cut; 1 left out" in w.describe()
    w6 = PackedWindows(*_stream([A, B]), 7, seed=0, sampling="epoch", packing=True, pad_id=0)
    assert w6.windows == 1 and [a.tolist() for a in w6.window(0)] == [
        [11, 12, 13, 14, 21, 22, 23], [-100, 13, 14, -100, -100, 23, -100], [0, 1, 2, 3, 0, 1, 2], [0, 0, 0, 0, 1, 1, 1]]
    batch = w6.sample([0, 1])
    assert batch.positions is not None and batch.tokens.shape == (2, 7)
    padded = PackedWindows(*_stream([A, B]), 7, seed=0, sampling="epoch", packing=False, pad_id=0)
    assert padded.windows == 2 and [a.tolist() for a in padded.window(1)][:2] == [[21, 22, 23, 0, 0, 0, 0],
                                                                                  [-100, 23, -100, -100, -100, -100, -100]]
    assert padded.sample([0]).positions is None and padded.sample([0]).document_ids is None  # causal suffices


def test_packed_windows_epochs_and_random():
    rng = np.random.default_rng(1)
    convs = [[(int(t), int(c)) for t, c in zip(rng.integers(1, 99, n), rng.integers(0, 2, n) | (np.arange(n) == n - 1))]
             for n in rng.integers(2, 12, size=40)]
    tokens, flags = _stream(convs)
    w = PackedWindows(tokens, flags, 16, seed=3, sampling="epoch", packing=True, pad_id=0)
    n = w.windows
    for e in range(2):  # every window once per epoch, a different order each epoch
        assert sorted(w.order(i) for i in range(e * n, (e + 1) * n)) == list(range(n))
        assert w.epoch(e * n) == e
    assert [w.order(i) for i in range(n)] != [w.order(i) for i in range(n, 2 * n)]
    again = PackedWindows(tokens, flags, 16, seed=3, sampling="epoch", packing=True, pad_id=0)
    assert torch.equal(again.sample([5, n + 2]).targets, w.sample([5, n + 2]).targets)  # a pure function of i
    r = PackedWindows(tokens, flags, 16, seed=3, sampling="random", packing=True, pad_id=0)
    assert r.epoch(7) is None and all(0 <= r.order(i) < n for i in range(50))
    counted = sum(int((w.window(k)[1] != -100).sum()) for k in range(n))
    assert counted == sum(c for conv in convs for _, c in conv[1:])  # no conversation cut at 16: all counted


def test_text_document_metadata():
    eos = 0
    x = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    positions, ids = document_metadata(x, eos)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 1, 1]]


def test_text_windows_with_document_mask():
    """make_windows on a text corpus: the sampler's windows, with document metadata only under data.document_mask."""
    from types import SimpleNamespace
    from megatron_lite.data.packing import make_windows
    from megatron_lite.data.sampler import EpochSampler
    tokens = np.array([5, 6, 0, 7, 8, 9, 0, 4, 3, 0, 2, 1, 0], dtype=np.uint16)  # documents end with EOS = 0
    val = np.array([9, 8, 0, 7, 6, 0], dtype=np.uint16)
    corpus = SimpleNamespace(train_tokens=lambda: tokens, val_tokens=lambda: val, data_format="text",
                             meta={"tokenizer": {"eos_id": 0}})
    lines = []
    plain, _ = make_windows(DataConfig(sampling="epoch"), corpus, 4, seed=1, log=lines.append)
    masked, _ = make_windows(DataConfig(sampling="epoch", document_mask=True), corpus, 4, seed=1)
    assert lines == ["data: validation: 6 tokens (31.6%) held out by the split"]
    x, y = EpochSampler(tokens, 4, 1).batch([0, 1, 2])
    a, b = plain.sample([0, 1, 2]), masked.sample([0, 1, 2])
    assert a.positions is None and a.document_ids is None and plain.windows == masked.windows == 3
    assert torch.equal(a.tokens, x) and torch.equal(b.tokens, x) and torch.equal(b.targets, y)
    assert torch.equal(torch.stack(document_metadata(x, 0)), torch.stack([b.positions, b.document_ids]))
