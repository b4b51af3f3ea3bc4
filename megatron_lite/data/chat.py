"""Chat and instruction rows as token ids, with the tokens the loss counts.

- `data.format=chat`: rows with `messages` (`[{"role": ..., "content": ...}, ...]`, the OpenAI / Hugging Face
  format; optional `tools`), rendered by the tokenizer's chat template (chat_template.py) and tokenized without
  added special tokens, as transformers' `apply_chat_template` does; the loss counts the assistant's text.
- `data.format=prompt_completion`: rows with `prompt` and `completion` strings (TRL's format): BOS when the
  tokenizer's convention has one, prompt + completion tokenized as one text, then EOS; the loss counts the
  completion and the EOS.

A token counts when its characters overlap a counted span (transformers' rule for the assistant mask).
"""
from __future__ import annotations

from typing import Sequence

from .chat_template import ChatTemplate
from .config import DataError


def token_offsets(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, [start, end) characters of each token) of `text` encoded as `tok.encode(text)` encodes it."""
    if tok.kind == "hf":
        enc = tok.tk.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    base = 0
    for n, line in enumerate(text.split("\n")):  # as SentencePieceTokenizer.encode: lines, joined by <n>
        if n:
            ids.append(tok.newline_id)
            offsets.append((base - 1, base))
        char_at = [i for i, ch in enumerate(line) for _ in range(len(ch.encode("utf-8")))] + [len(line)]
        for piece in tok.sp.encode(line, out_type="proto").pieces:
            ids.append(piece.id)
            offsets.append((base + char_at[piece.begin], base + char_at[piece.end]))
        base += len(line) + 1
    return ids, offsets


def span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for each token overlapping a span (spans in order): transformers' assistant-mask rule."""
    mask, k = [False] * len(offsets), 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[i] = end > spans[k][0]
    return mask


def encode_chat(tok, template: ChatTemplate, messages: list[dict], tools: list | None = None
                ) -> tuple[list[int], list[bool]]:
    """(ids, counted) of a conversation: `apply_chat_template(messages)`'s ids, True on the assistant's tokens."""
    text, spans = template.assistant_spans(messages, tools)
    ids, offsets = token_offsets(tok, text)
    return ids, span_mask(offsets, spans)


def encode_prompt_completion(tok, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
    """(ids, counted): [BOS] prompt + completion EOS, True on the completion's tokens and the EOS."""
    ids, offsets = token_offsets(tok, prompt + completion)
    counted = span_mask(offsets, [(len(prompt), len(prompt) + len(completion))])
    bos = [tok.bos_id] if tok.add_bos else []
    return bos + ids + [tok.eos_id], [False] * len(bos) + counted + [True]


def check_record(record, fmt: str, where: str) -> tuple:
    """The fields of a row that its format needs, checked: (messages, tools) or (prompt, completion)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__} where an object was expected")
    need = ("messages",) if fmt == "chat" else ("prompt", "completion")
    missing = [k for k in need if record.get(k) is None]
    if missing:
        raise DataError(f"{where}: no {' or '.join(repr(k) for k in missing)} field (it has: "
                        f"{', '.join(map(str, record)) or 'none'}): data.format={fmt} reads "
                        f"{' and '.join(repr(k) for k in need)}")
    if fmt == "chat":
        messages, tools = record["messages"], record.get("tools")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                            f"objects")
        return messages, tools if isinstance(tools, list) else None
    for k in need:
        if not isinstance(record[k], str):
            raise DataError(f"{where}: field {k!r} is {type(record[k]).__name__}, not a string")
    return record["prompt"], record["completion"]


def encode_record(tok, template: ChatTemplate | None, fields: tuple, fmt: str, where: str
                  ) -> tuple[list[int], list[bool]]:
    if fmt == "prompt_completion":
        return encode_prompt_completion(tok, *fields)
    import jinja2
    try:
        return encode_chat(tok, template, *fields)
    except jinja2.TemplateError as e:  # raise_exception in the template: roles that do not alternate, ...
        raise DataError(f"{where}: the chat template refuses this conversation: {e}") from None
