"""The data layer of the training entry point: formats, loss masks, unusable rows, empty datasets."""

import json

import pytest

from ds_scalora.train.data import IGNORE, DataError, load_rows, pack, tokenize
from ds_scalora.train.model import byte_tokenizer


def _rows(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_rows(str(path))


def test_formats_and_loss_masks(tmp_path):
    tok = byte_tokenizer()
    pc = tokenize(_rows(tmp_path, [{"prompt": "Q?\n", "completion": "42"}]), tok, "auto", 64, "pc")
    prompt_len = len(tok("Q?\n")["input_ids"])
    assert pc.labels[0][:prompt_len] == [IGNORE] * prompt_len  # no loss on the prompt
    assert pc.labels[0][prompt_len:] == pc.input_ids[0][prompt_len:] and pc.answers == ["42"]
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    ch = tokenize(_rows(tmp_path, chat, "c.jsonl"), tok, "auto", 64, "chat")
    answer = [i for i, l in zip(ch.input_ids[0], ch.labels[0]) if l != IGNORE]
    assert tok.decode(answer).startswith("yo") and ch.prompts[0] == ch.input_ids[0][: len(ch.prompts[0])]
    tx = tokenize(_rows(tmp_path, [{"text": "hello world"}], "t.jsonl"), tok, "auto", 64, "text")
    assert IGNORE not in tx.labels[0]


def test_unusable_rows_are_counted_by_position(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"prompt": "", "completion": "x"},
            {"prompt": "c", "completion": "d"}]  # fmt: skip
    ex = tokenize(_rows(tmp_path, rows), byte_tokenizer(), "prompt_completion", 64, "d")
    assert len(ex) == 2
    assert ex.skipped == {"missing or empty 'completion'": [1], "missing or empty 'prompt'": [2]}


def test_no_usable_row_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable row"):
        tokenize(_rows(tmp_path, [{"prompt": "a"}]), byte_tokenizer(), "prompt_completion", 64, "d")
    with pytest.raises(DataError, match="cannot tell the row format"):
        tokenize(_rows(tmp_path, [{"question": "a"}]), byte_tokenizer(), "auto", 64, "d")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(tmp_path / "data.csv"))
    # truncation that leaves no answer token is reported, not trained on
    with pytest.raises(DataError, match="nothing to learn"):
        tokenize(_rows(tmp_path, [{"prompt": "x" * 50, "completion": "y"}]), byte_tokenizer(), "auto", 16, "d")


def test_packing_keeps_masks_and_fills_rows(tmp_path):
    rows = [{"prompt": f"Q{i}?\n", "completion": str(i)} for i in range(20)]
    ex = pack(tokenize(_rows(tmp_path, rows), byte_tokenizer(), "auto", 64, "d"), 16)
    assert all(len(ids) == 16 for ids in ex.input_ids)
    assert any(IGNORE in labels for labels in ex.labels)


def test_malformed_and_empty_files_name_the_line_or_say_empty(tmp_path):
    from ds_scalora.train.data import DataError, load_rows

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl could not be read as json: line 3 is not valid JSON"):
        load_rows(str(bad))
    listed = tmp_path / "list.jsonl"
    listed.write_text('{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(DataError, match=r"line 2 is a JSON list, not an object"):
        load_rows(str(listed))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl is empty: it holds no rows"):
        load_rows(str(empty))
