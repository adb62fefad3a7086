"""Prompt sources: the embedded corpus, its fixed split, JSONL files with line-numbered errors, datasets."""

from __future__ import annotations

import doctest
import sys

import pytest

from policygrad.errors import UsageError
from policygrad.lm import data, tasks


@pytest.mark.exact
def test_docstring_examples_run():
    assert doctest.testmod(data).failed == 0


@pytest.mark.property
def test_corpus_is_prose_and_deterministic():
    passages = data.corpus_passages()
    assert len(passages) >= 300
    assert passages == data.corpus_passages()
    assert all(len(p) >= data.MIN_PASSAGE_CHARS and "\n" not in p for p in passages)


@pytest.mark.property
def test_pydoc_prompts_split_and_cut_to_tokens(char_tokenizer):
    tokenizer = char_tokenizer  # one token per character
    prompts = data.load_prompts("pydoc", tokenizer, heldout=100, max_passage_tokens=40, target_length=32)
    assert len(prompts.heldout) == 100 and len(prompts.train) >= 200
    train_prompts = {r["prompt"] for r in prompts.train}
    assert not train_prompts & {r["prompt"] for r in prompts.heldout}
    for record in prompts.train[:50]:
        passage, _, instruction = record["prompt"].rpartition("\n\n")
        assert len(tokenizer.encode(passage, add_special_tokens=False)) <= 40
        assert instruction == tasks.instruction(32, record["target_digit_sum"])
        assert 5 <= record["target_digit_sum"] <= 20 and record["target_length"] == 32
    again = data.load_prompts("pydoc", tokenizer, heldout=100, max_passage_tokens=40, target_length=32)
    assert [r["prompt"] for r in again.heldout] == [r["prompt"] for r in prompts.heldout]


@pytest.mark.exact
def test_truncate_keeps_short_text_and_cuts_at_a_word(char_tokenizer):
    tokenizer = char_tokenizer
    assert data.truncate_to_tokens("short text", tokenizer, 50) == "short text"
    assert data.truncate_to_tokens("alpha beta gamma", tokenizer, 13) == "alpha beta"


@pytest.mark.exact
def test_jsonl_records_keep_their_fields(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b", "answer": 2}\n')
    assert data.read_jsonl(path) == [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}]


@pytest.mark.exact
@pytest.mark.parametrize(
    "lines, line_number, fragment",
    [
        (['{"prompt": "a"}', '{"prompt": "b",}'], 2, "not valid JSON"),
        (['{"prompt": "a"}', "", '["a list"]'], 3, "JSON object"),
        (['{"prompt": "a"}', '{"text": "no prompt"}'], 2, '"prompt"'),
        (['{"prompt": ""}'], 1, '"prompt"'),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, line_number, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError) as info:
        data.read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line_number}: ") and fragment in message and "\n" not in message


@pytest.mark.exact
def test_missing_or_empty_files(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        data.read_jsonl(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="no prompts"):
        data.read_jsonl(tmp_path / "empty.jsonl")


@pytest.mark.exact
def test_unknown_source_and_missing_datasets_package(monkeypatch):
    with pytest.raises(UsageError, match="expected 'pydoc'"):
        data.load_prompts("prompts.txt", None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError, never the network
    with pytest.raises(UsageError, match="needs the datasets package") as info:
        data.load_prompts("hf:some/dataset", None)
    assert "\n" not in str(info.value)


@pytest.mark.property
def test_split_is_fixed_whatever_the_input_order_seed():
    records = [{"prompt": str(i)} for i in range(300)]
    first, second = data.split_records(records, 100), data.split_records(records, 100)
    assert first == second and len(first.heldout) == 100
    assert len(data.split_records(records[:10], 100).heldout) == 5  # never more than half
