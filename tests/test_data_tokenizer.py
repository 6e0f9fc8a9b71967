"""Pad-token safety, loss masks and data errors on the real SmolLM2 tokenizer."""

import json

import pytest

from qpeft.config import DataConfig
from qpeft.data import IGNORE, collate, encode, load_records, tokenize
from qpeft.errors import ConfigError
from qpeft.tokenizer import load_tokenizer, make_pad_token_safe


@pytest.fixture(scope="module")
def tok(embedded_model_path):
    return load_tokenizer(embedded_model_path)


def test_pad_equal_to_eos_is_replaced_by_an_existing_special_token(tok):
    tokenizer, decision = tok
    assert decision.action == "reused"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id < 49152  # no new token, no embedding resize
    assert not decision.needs_resize


def test_distinct_pad_is_kept(tok):
    tokenizer, _ = tok
    assert make_pad_token_safe(tokenizer).action == "kept"


def test_last_resort_adds_pad(embedded_model_path):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(embedded_model_path)
    t.pad_token = t.eos_token
    t.unk_token = t.eos_token  # no spare special token left
    d = make_pad_token_safe(t)
    assert d.action == "added" and d.needs_resize and t.pad_token_id == len(t) - 1


def test_prompt_is_masked_and_eos_is_learned(tok):
    tokenizer, _ = tok
    ex = encode({"prompt": "Say hi.", "response": "Hi there."}, "prompt_response", tokenizer, 256)
    first = next(i for i, l in enumerate(ex.labels) if l != IGNORE)
    assert all(l == IGNORE for l in ex.labels[:first])
    learned = tokenizer.decode([l for l in ex.labels if l != IGNORE])
    assert learned.startswith("Hi there.") and "Say hi" not in learned
    assert tokenizer.eos_token_id in [l for l in ex.labels if l != IGNORE]


def test_padding_is_masked_by_position_so_eos_survives(tok):
    tokenizer, _ = tok
    rows = [{"text": "a b c d e f"}, {"text": "a"}]
    data = tokenize(rows, "text", tokenizer, 64)
    batch = collate(data, pad_id=tokenizer.eos_token_id)  # even with pad == eos
    short = batch["labels"][1]
    n = len(data[1]["input_ids"])
    assert int(short[n - 1]) == tokenizer.eos_token_id
    assert (short[n:] == IGNORE).all()
    assert int(batch["attention_mask"][1].sum()) == n


def test_chat_loss_only_on_assistant_turns(tok):
    tokenizer, _ = tok
    msgs = [
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "Uno."},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "Dos."},
    ]
    ex = encode({"messages": msgs}, "chat", tokenizer, 512)
    learned = tokenizer.decode([l for l in ex.labels if l != IGNORE])
    assert "Uno." in learned and "Dos." in learned and "One?" not in learned and "Two?" not in learned


def test_embedded_sets_load():
    for path, fmt in (("embedded:instruct", "prompt_response"), ("embedded:text", "text")):
        train, val, got = load_records(DataConfig(path=path, max_val_examples=None))
        assert got == fmt and len(train) > 50 and len(val) >= 5


def test_bad_data_names_file_and_row(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + json.dumps({"prompt": "p"}) + "\n" + "{}\n")
    with pytest.raises(ConfigError, match=r"data.path: .*d.jsonl: row 2 has no usable 'response'"):
        load_records(DataConfig(path=str(f), val_path=str(f)))
    f.write_text('{"text": "x"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"row 2 is not valid JSON"):
        load_records(DataConfig(path=str(f)))
    f.write_text("")
    with pytest.raises(ConfigError, match=r"no records"):
        load_records(DataConfig(path=str(f)))
    with pytest.raises(ConfigError, match=r"data file not found"):
        load_records(DataConfig(path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ConfigError, match=r"unknown embedded set 'poems'"):
        load_records(DataConfig(path="embedded:poems"))


def test_embedded_eos_is_the_chat_templates_end_of_turn(tok, embedded_model_path):
    """Regression: transformers 5.17's GGUF conversion set SmolLM2's eos to <|im_start|>."""
    import json
    from pathlib import Path

    from qpeft.tokenizer import chat_turn_end_id

    tokenizer, _ = tok
    assert tokenizer.eos_token == "<|im_end|>" and chat_turn_end_id(tokenizer) == tokenizer.eos_token_id
    assert json.loads((Path(embedded_model_path) / "config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id


def test_wrong_eos_is_aligned_with_chat_template(embedded_model_path):
    from transformers import AutoTokenizer

    from qpeft.tokenizer import align_eos_with_chat_template

    t = AutoTokenizer.from_pretrained(embedded_model_path)
    t.eos_token = "<|im_start|>"  # what transformers 5.17's GGUF conversion produced
    assert "<|im_end|>" in align_eos_with_chat_template(t)
    assert t.eos_token == "<|im_end|>" and align_eos_with_chat_template(t) is None


ROWS = [{"prompt": f"Question {i}?", "response": f"Answer number {i}."} for i in range(6)]


@pytest.mark.parametrize("kind", ["csv", "parquet", "jsonl", "saved"])
def test_data_files_read_through_datasets(tmp_path, kind):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    if kind == "saved":
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    else:
        path = tmp_path / f"d.{kind}"
        {"csv": ds.to_csv, "parquet": ds.to_parquet, "jsonl": ds.to_json}[kind](str(path))
    train, val, fmt = load_records(DataConfig(path=str(path), val_fraction=0.34))
    assert fmt == "prompt_response"
    assert train + val == ROWS


def test_bad_jsonl_row_is_named_even_when_datasets_reads_first(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",,}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl: row 3 is not valid JSON"):
        load_records(DataConfig(path=str(p)))


def test_too_long_policy(tok):
    tokenizer, _ = tok
    rows = [{"text": "short"}, {"text": "a much longer line of text " * 20}]
    said = []
    assert len(tokenize(rows, "text", tokenizer, 16, too_long="truncate", source="f.jsonl", say=said.append)) == 2
    assert "1 row longer" in said[0] and "(row 2)" in said[0] and "truncated" in said[0]
    assert len(tokenize(rows, "text", tokenizer, 16, too_long="drop", source="f.jsonl")) == 1
    with pytest.raises(ConfigError, match=r"f.jsonl: row 2 has \d+ tokens, more than data.max_length=16"):
        tokenize(rows, "text", tokenizer, 16, too_long="error", source="f.jsonl")


def test_example_token_count_equals_the_collated_count(tok):
    """The native trainer counts a step's tokens from its examples (every rank, for the whole
    step) instead of collating the other ranks' batches: the same number in any batching."""
    from qpeft.data import count_example_tokens, count_input_tokens, pack

    tokenizer, _ = tok
    rows = [{"text": "word " * n} for n in (3, 17, 1, 40, 9, 25, 2)]
    data = tokenize(rows, "text", tokenizer, 64, too_long="truncate", source="f.jsonl")
    pad = tokenizer.pad_token_id
    for examples in (data, pack(data, 64)):
        for size in (1, 2, 3):
            collated = sum(count_input_tokens(collate(examples[i : i + size], pad), pad) for i in range(0, len(examples), size))
            assert count_example_tokens(examples, pad) == collated
    # a pad-id token inside a packed row is not counted, as the collated count (and the HF Trainer) does
    packed = [{**pack(data, 64)[0]}]
    packed[0]["input_ids"] = [pad] + packed[0]["input_ids"][1:]
    assert count_example_tokens(packed, pad) == count_input_tokens(collate(packed, pad), pad) == len(packed[0]["input_ids"]) - 1
