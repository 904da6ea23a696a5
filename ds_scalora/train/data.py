"""Training data through ``datasets``: local files in, tokenized examples with loss masks out.

Three row formats, detected from the columns (or forced by ``data.format``):

* ``text``: a ``text`` column; loss on every token;
* ``prompt_completion``: ``prompt`` and ``completion`` columns; loss on the completion only;
* ``chat``: a ``messages`` column (``[{"role", "content"}, ...]``) rendered with the tokenizer's chat
  template; loss on the assistant's last answer only.

Rows that cannot be used (missing or empty fields, non-string content, nothing left to learn after
truncation) are dropped, counted and reported by position; a dataset with no usable row is an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

IGNORE = -100


class DataError(ValueError):
    """The data cannot be used; the message names the file and the problem."""


@dataclass
class Examples:
    """Tokenized rows: input ids, labels (-100 where there is no loss) and the raw fields for eval."""

    input_ids: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    prompts: list = field(default_factory=list)  # prompt ids (for exact-match generation), or None
    answers: list = field(default_factory=list)  # reference answer text, or None
    skipped: dict = field(default_factory=dict)  # reason -> row positions

    def __len__(self):
        return len(self.input_ids)


def load_rows(path: str):
    """A ``datasets.Dataset`` from a JSON/JSONL/Parquet file or a ``save_to_disk`` directory."""
    import datasets

    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # noqa: BLE001 - datasets raises several types here
            raise DataError(f"{path} is not a saved dataset directory ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path} holds splits {list(ds)}, none named 'train'")
            ds = ds["train"]
        return ds
    ext = os.path.splitext(path)[1].lower()
    builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(ext)
    if builder is None:
        raise DataError(f"{path}: unsupported file type {ext!r}; use .json, .jsonl, .parquet or a saved dataset directory")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty: it holds no rows")
    try:
        rows = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as e:  # noqa: BLE001
        where = _bad_json_line(path) if ext == ".jsonl" else None
        raise DataError(f"{path} could not be read as {builder}: {where or e}") from None
    if len(rows) == 0:
        raise DataError(f"{path} holds no rows")
    return rows


def _bad_json_line(path: str) -> str | None:
    """The first line of a JSONL file that is not one JSON object, with its number (1-based)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number} is not valid JSON ({e.msg} at column {e.colno}): {line.strip()[:80]!r}"
            if not isinstance(value, dict):
                return f"line {number} is a JSON {type(value).__name__}, not an object: {line.strip()[:80]!r}"
    return None


def detect_format(columns) -> str:
    if "messages" in columns:
        return "chat"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise DataError(
        f"cannot tell the row format from the columns {sorted(columns)}: expected 'text', "
        "'prompt' + 'completion', or 'messages'"
    )


def tokenize(rows, tokenizer, fmt: str, max_length: int, source: str) -> Examples:
    """Tokenize every row; unusable rows are skipped and counted by reason."""
    fmt = detect_format(rows.column_names) if fmt == "auto" else fmt
    out = Examples()
    for position, row in enumerate(rows):
        try:
            prompt_ids, answer_ids, answer = _encode(row, tokenizer, fmt)
        except _Unusable as e:
            out.skipped.setdefault(str(e), []).append(position)
            continue
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            out.skipped.setdefault("nothing to learn after truncation to max_length", []).append(position)
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.prompts.append(prompt_ids if fmt != "text" else None)
        out.answers.append(answer)
    if not out.input_ids:
        reasons = "; ".join(f"{r}: rows {v[:5]}" for r, v in out.skipped.items())
        raise DataError(f"{source}: no usable row ({reasons or 'the dataset is empty'})")
    return out


class _Unusable(Exception):
    pass


def _text(row, key):
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _Unusable(f"missing or empty {key!r}")
    return value


def _encode(row, tokenizer, fmt):
    if fmt == "text":
        ids = tokenizer(_text(row, "text"), add_special_tokens=True)["input_ids"]
        return [], ids + [tokenizer.eos_token_id], None
    if fmt == "prompt_completion":
        prompt, completion = _text(row, "prompt"), _text(row, "completion")
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return prompt_ids, answer_ids, completion.strip()
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages
    ):
        raise _Unusable("'messages' is not a list of {role, content}")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise _Unusable("the last message is not a non-empty assistant answer")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat rows need a tokenizer with a chat template; this tokenizer has none")
    prompt_ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    full_ids = tokenizer.apply_chat_template(messages, tokenize=True)
    if hasattr(prompt_ids, "keys"):  # transformers 5 returns a BatchEncoding
        prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise _Unusable("the chat template does not render the prompt as a prefix of the conversation")
    return list(prompt_ids), list(full_ids[len(prompt_ids):]), messages[-1]["content"].strip()


def pack(examples: Examples, max_length: int) -> Examples:
    """Concatenate examples into rows of exactly ``max_length`` tokens (loss masks kept)."""
    out = Examples(skipped=examples.skipped)
    ids, labels = [], []
    for i, l in zip(examples.input_ids, examples.labels):
        ids += i
        labels += l
        while len(ids) >= max_length:
            out.input_ids.append(ids[:max_length])
            out.labels.append(labels[:max_length])
            out.prompts.append(None)
            out.answers.append(None)
            ids, labels = ids[max_length:], labels[max_length:]
    if not out.input_ids:
        raise DataError(f"packing to max_length={max_length} produced no full row: lower data.max_length")
    return out


def collate(batch_ids, batch_labels, pad_id: int) -> dict:
    """Right-padded tensors with an attention mask."""
    n = max(len(x) for x in batch_ids)
    ids = torch.full((len(batch_ids), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch_ids), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), n), dtype=torch.long)
    for row, (i, l) in enumerate(zip(batch_ids, batch_labels)):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(l)] = torch.tensor(l)
        mask[row, : len(i)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
