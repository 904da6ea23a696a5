"""Training data through ``datasets``: local files in, tokenized examples with loss masks out.

Row formats, detected from the columns (or forced by ``data.format``):

* ``text``: a ``text`` column; loss on every token;
* ``prompt_completion``: ``prompt`` and ``completion`` columns; loss on the completion only;
* ``chat``: a ``messages`` column (``[{"role", "content"}, ...]``) rendered with the tokenizer's chat
  template (or ``data.chat_template``); loss on every assistant turn, or on the last one only with
  ``data.mask_history`` (LLaMA-Factory's name);
* ``alpaca``: ``instruction``, optional ``input``, ``output`` (and optional ``system`` and ``history``, a
  list of ``[question, answer]`` pairs, as LLaMA-Factory reads them): one user turn of the instruction
  followed by a blank line and the input, answered by ``output``, through the chat template;
* ``sharegpt``: ``conversations`` of ``{"from", "value"}`` (``human``/``user``, ``gpt``/``assistant``,
  ``system``; optional ``system`` column), read as ``chat``.

Every turn's tokens come from rendering the conversation up to that turn, so a template that renders
each prefix as a prefix of the whole (every common one) gives exactly its own tokens; one that does
not is reported. ``pack`` puts several rows in one sequence by TRL's best-fit-decreasing packing, with
position ids that restart at each row, so that attention stays inside each row (``collate``).

Rows that cannot be used (missing or empty fields, non-string content, nothing left to learn after
truncation) are dropped, counted and reported by position; a dataset with no usable row is an error.
"""

from __future__ import annotations

import itertools
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
    seq_lengths: list | None = None  # packed: the lengths of the rows in each sequence, in order

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


FORMATS = ("auto", "text", "prompt_completion", "chat", "alpaca", "sharegpt")


def detect_format(columns) -> str:
    if "messages" in columns:
        return "chat"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise DataError(
        f"cannot tell the row format from the columns {sorted(columns)}: expected 'text', 'prompt' + 'completion', "
        "'messages' (chat), 'conversations' (sharegpt) or 'instruction' + 'output' (alpaca); or set data.format"
    )


def tokenize(rows, tokenizer, fmt: str, max_length: int, source: str, mask_history: bool = False) -> Examples:
    """Tokenize every row; unusable rows are skipped and counted by reason."""
    fmt = detect_format(rows.column_names) if fmt == "auto" else fmt
    out = Examples()
    for position, row in enumerate(rows):
        try:
            ids, labels, prompt_ids, answer = _encode(row, tokenizer, fmt, mask_history)
        except _Unusable as e:
            out.skipped.setdefault(str(e), []).append(position)
            continue
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            out.skipped.setdefault("nothing to learn after truncation to max_length", []).append(position)
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.prompts.append(prompt_ids)
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


def _encode(row, tokenizer, fmt, mask_history=False):
    """(input ids, labels, prompt ids of the last answer or None, last answer text or None) of one row."""
    if fmt == "text":
        ids = tokenizer(_text(row, "text"), add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        return ids, list(ids), None, None
    if fmt == "prompt_completion":
        prompt, completion = _text(row, "prompt"), _text(row, "completion")
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids, prompt_ids, completion.strip()
    messages = {"chat": _chat_messages, "alpaca": alpaca_messages, "sharegpt": sharegpt_messages}[fmt](row)
    return chat_labels(messages, tokenizer, mask_history)


def _chat_messages(row) -> list:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages
    ):
        raise _Unusable("'messages' is not a list of {role, content}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def alpaca_messages(row) -> list:
    """An alpaca row as chat messages: [system], history pairs, then instruction (+ blank line + input) -> output."""
    instruction, output = _text(row, "instruction"), _text(row, "output")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _Unusable("'input' is not a string")
    messages = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    history = row.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair) for pair in history
    ):
        raise _Unusable("'history' is not a list of [question, answer] pairs")
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    content = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    return messages + [{"role": "user", "content": content}, {"role": "assistant", "content": output}]


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_messages(row) -> list:
    """A sharegpt row (``conversations`` of ``{"from", "value"}``, optional ``system``) as chat messages."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns or not all(
        isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") for t in turns
    ):
        raise _Unusable("'conversations' is not a list of {from, value}")
    unknown = sorted({t["from"] for t in turns} - set(SHAREGPT_ROLES))
    if unknown:
        raise _Unusable(f"'conversations' has roles {unknown} (known: {', '.join(SHAREGPT_ROLES)})")
    messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
    if isinstance(row.get("system"), str) and row["system"].strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": row["system"]})
    return messages


def _render(tokenizer, messages, generation_prompt: bool) -> list:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def chat_labels(messages: list, tokenizer, mask_history: bool = False):
    """(ids, labels, prompt ids of the last answer, last answer) of a conversation: loss on the tokens of every
    assistant turn (the last one only with ``mask_history``), each found by rendering the conversation up to
    that turn with and without it."""
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise _Unusable("the last message is not a non-empty assistant answer")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("chat rows need a chat template; this tokenizer has none: set data.chat_template")
    ids = _render(tokenizer, messages, False)
    labels = [IGNORE] * len(ids)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prompt_ids = None
    for i in answers[-1:] if mask_history else answers:
        prompt_ids, upto = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        if ids[: len(upto)] != upto or upto[: len(prompt_ids)] != prompt_ids:
            raise _Unusable("the chat template does not render each turn as a prefix of the conversation")
        labels[len(prompt_ids) : len(upto)] = upto[len(prompt_ids) :]
    return ids, labels, prompt_ids, messages[-1]["content"].strip()


def pack(examples: Examples, max_length: int) -> Examples:
    """Rows packed into sequences of at most ``max_length`` tokens by TRL's best-fit-decreasing packing (no row
    is cut or dropped; tokenize already truncated each to ``max_length``). Each sequence keeps its rows'
    lengths, from which ``collate`` restarts the position ids (attention stays inside a row), and the first
    token of every row after the first loses its label (it would be predicted from the previous row)."""
    import datasets
    from trl import pack_dataset

    rows = datasets.Dataset.from_dict({"input_ids": examples.input_ids, "labels": examples.labels})
    packed = pack_dataset(rows, max_length, strategy="bfd")
    out = Examples(skipped=examples.skipped, seq_lengths=[])
    for ids, labels, lengths in zip(packed["input_ids"], packed["labels"], packed["seq_lengths"]):
        labels = list(labels)
        for start in itertools.accumulate(lengths[:-1]):
            labels[start] = IGNORE
        out.input_ids.append(list(ids))
        out.labels.append(labels)
        out.seq_lengths.append(list(lengths))
        out.prompts.append(None)
        out.answers.append(None)
    return out


def position_ids(lengths: list) -> list:
    """Position ids that restart at 0 for every packed row."""
    return [p for n in lengths for p in range(n)]


def collate(batch_ids, batch_labels, pad_id: int, seq_lengths=None) -> dict:
    """Right-padded tensors. Unpacked: with an attention mask. Packed (``seq_lengths`` per sequence): with
    position ids restarting at each row and no attention mask, from which transformers builds a causal mask
    that is block-diagonal over the rows (``masking_utils.find_packed_sequence_indices``); the padding is one
    more block, attending only to itself, without labels. (transformers looks for packing only without a KV cache:
    the run sets ``use_cache=False``.)"""
    n = max(len(x) for x in batch_ids)
    ids = torch.full((len(batch_ids), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch_ids), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), n), dtype=torch.long)
    for row, (i, l) in enumerate(zip(batch_ids, batch_labels)):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(l)] = torch.tensor(l)
        mask[row, : len(i)] = 1
    if seq_lengths is None:
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    positions = torch.zeros((len(batch_ids), n), dtype=torch.long)
    for row, (i, lengths) in enumerate(zip(batch_ids, seq_lengths)):
        positions[row] = torch.tensor(position_ids(list(lengths) + ([n - len(i)] if n > len(i) else [])))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}
