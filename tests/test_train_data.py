"""The data layer of the training entry point: formats, loss masks, unusable rows, empty datasets."""

import json

import pytest
import torch

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


def test_packing_keeps_every_row_whole_and_labels_nothing_across_rows(tmp_path):
    """TRL's best-fit-decreasing packing: every row lands whole in exactly one sequence (nothing cut, no tail
    dropped), sequences stay within max_length, and the first token of each later row is not a target (it
    would be predicted from the row before it)."""
    rows = [{"prompt": f"Q{i}?" + "x" * (i % 7), "completion": str(i) * (1 + i % 3)} for i in range(40)]
    ex = tokenize(_rows(tmp_path, rows), byte_tokenizer(), "auto", 64, "d")
    packed = pack(ex, 32)
    assert len(packed) < len(ex) and all(len(ids) <= 32 for ids in packed.input_ids)
    pieces = []
    for ids, labels, lengths in zip(packed.input_ids, packed.labels, packed.seq_lengths):
        assert sum(lengths) == len(ids) == len(labels)
        start = 0
        for k, n in enumerate(lengths):
            doc_ids, doc_labels = ids[start : start + n], labels[start : start + n]
            if k > 0:
                assert doc_labels[0] == IGNORE
            pieces.append((tuple(doc_ids), tuple(doc_labels[1:])))
            start += n
    original = sorted((tuple(i), tuple(l[1:])) for i, l in zip(ex.input_ids, ex.labels))
    assert sorted(pieces) == original


def _tiny_llama(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn,
                         use_cache=False)  # fmt: skip  # as the run sets it: with a cache transformers ignores packing
    return LlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_do_not_attend_to_each_other(attn):
    """A token's logits in a packed sequence are those of its row alone, whatever the other rows hold: the
    position ids restart per row and transformers masks block-diagonally. Without the position ids (one
    long causal sequence, what packing did before) the second row's logits do change."""
    from ds_scalora.train.data import collate

    model = _tiny_llama(attn)
    first, other_first, second = [5, 6, 7, 8, 9], [50, 60, 70, 80, 90], [11, 12, 13, 14]
    alone = model(input_ids=torch.tensor([second])).logits[0]
    outs = []
    for head in (first, other_first):
        batch = collate([head + second, head], [head + second, head], 0, [[len(head), len(second)], [len(head)]])
        assert "attention_mask" not in batch and batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
        outs.append(model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, len(head):])
    torch.testing.assert_close(outs[0], alone, rtol=0, atol=1e-10)  # fp64: only summation order differs
    torch.testing.assert_close(outs[1], alone, rtol=0, atol=1e-10)
    leaky = [model(input_ids=torch.tensor([h + second])).logits[0, len(h):] for h in (first, other_first)]
    assert float((leaky[0] - leaky[1]).abs().max().detach()) > 1e-3


def _spans(ids, labels, tok):
    """The decoded runs of labelled tokens."""
    runs, current = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE:
            current.append(i)
        elif current:
            runs.append(tok.decode(current)), current.clear()
    return runs + ([tok.decode(current)] if current else [])


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                {"role": "assistant", "content": "A2"}, {"role": "user", "content": "U3"},
                {"role": "assistant", "content": "A3"}]  # fmt: skip


def test_a_three_turn_chat_puts_loss_on_exactly_its_three_answers(tmp_path):
    tok = byte_tokenizer()
    ex = tokenize(_rows(tmp_path, [{"messages": CONVERSATION}]), tok, "auto", 256, "chat")
    assert ex.input_ids[0] == list(tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"])
    # the ChatML template closes every turn with <|im_end|> and a newline: both are part of the answer
    assert _spans(ex.input_ids[0], ex.labels[0], tok) == ["A1<|im_end|>\n", "A2<|im_end|>\n", "A3<|im_end|>\n"]
    last = tokenize(_rows(tmp_path, [{"messages": CONVERSATION}]), tok, "auto", 256, "chat", mask_history=True)
    assert _spans(last.input_ids[0], last.labels[0], tok) == ["A3<|im_end|>\n"]
    prompt = tok.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ex.prompts[0] == list(prompt) and ex.answers == ["A3"]  # exact match asks for the last answer


def test_alpaca_and_sharegpt_rows_render_as_the_chat_template_says(tmp_path):
    tok = byte_tokenizer()
    alpaca = {"instruction": "Add.", "input": "2 + 2", "output": "4", "system": "Be brief.",
              "history": [["Hi", "Hello"]]}  # fmt: skip
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Add.\n\n2 + 2"},
                {"role": "assistant", "content": "4"}]  # fmt: skip
    ex = tokenize(_rows(tmp_path, [alpaca, {"instruction": "Say hi.", "output": "hi"}], "a.jsonl"), tok, "auto", 256, "a")
    assert ex.input_ids[0] == list(tok.apply_chat_template(expected, tokenize=True)["input_ids"])
    assert _spans(ex.input_ids[0], ex.labels[0], tok) == ["Hello<|im_end|>\n", "4<|im_end|>\n"]
    plain = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]  # no input: no blank line
    assert ex.input_ids[1] == list(tok.apply_chat_template(plain, tokenize=True)["input_ids"])
    share = {"system": "Be brief.", "conversations": [{"from": "human", "value": "U1"}, {"from": "gpt", "value": "A1"},
             {"from": "human", "value": "U2"}, {"from": "gpt", "value": "A2"}]}  # fmt: skip
    bad = {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{}"}]}
    sg = tokenize(_rows(tmp_path, [share, bad], "s.jsonl"), tok, "auto", 256, "s")
    assert sg.input_ids[0] == list(tok.apply_chat_template(CONVERSATION[:5], tokenize=True)["input_ids"])
    assert _spans(sg.input_ids[0], sg.labels[0], tok) == ["A1<|im_end|>\n", "A2<|im_end|>\n"]
    assert list(sg.skipped) == ["'conversations' has roles ['function_call'] (known: human, user, gpt, assistant, system)"]


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


def test_a_chat_template_from_the_config_replaces_the_tokenizers(tmp_path, monkeypatch):
    from pathlib import Path

    from ds_scalora.train.config import load_config
    from ds_scalora.train.model import load_tokenizer

    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    tiny = Path(__file__).resolve().parents[1] / "ds_configs" / "tiny.yaml"
    monkeypatch.chdir(tiny.parent)
    tok = load_tokenizer(load_config(str(tiny), [f"data.chat_template={template}"]))
    ex = tokenize(_rows(tmp_path, [{"messages": CONVERSATION[1:3]}], "c.jsonl"), tok, "auto", 256, "c")
    assert tok.decode(ex.input_ids[0]) == "[user] U1\n[assistant] A1\n"
    assert _spans(ex.input_ids[0], ex.labels[0], tok) == ["A1\n"]
