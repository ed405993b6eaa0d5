"""Reading pairs from files and lists, tokenising, collating and length-grouped batches."""
import json

import pytest

from finetune.data.batching import LengthGroupedBatches
from finetune.data.collate import IGNORE_INDEX, Collator
from finetune.data.pairs import DataError, read_pairs
from finetune.data.tokenize import tokenize_pairs
from finetune.models import char_tokenizer


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_reads_each_format(tmp_path):
    jsonl = write(tmp_path, "a.jsonl", '{"source": "teh", "target": "the"}\n\n{"source": "wich", "target": "which"}\n')
    tsv = write(tmp_path, "a.tsv", "source\ttarget\nteh\tthe\nwich\twhich\n")
    csv = write(tmp_path, "a.csv", 'teh,the\n"a, b","c"\n')
    assert read_pairs(jsonl) == [("teh", "the"), ("wich", "which")]
    assert read_pairs(tsv) == [("teh", "the"), ("wich", "which")]
    assert read_pairs(csv) == [("teh", "the"), ("a, b", "c")]
    assert read_pairs([("x", "y")]) == [("x", "y")]


def test_jsonl_field_names(tmp_path):
    path = write(tmp_path, "b.jsonl", json.dumps({"typo": "teh", "fix": "the"}) + "\n")
    assert read_pairs(path, "typo", "fix") == [("teh", "the")]
    with pytest.raises(DataError, match=r"b\.jsonl:1: missing field\(s\) \['source', 'target'\]"):
        read_pairs(path)


@pytest.mark.parametrize("name,text,message", [
    ("bad.jsonl", '{"source": "a", "target": "b"}\n{"source": "a", \n', r"bad\.jsonl:2: invalid JSON"),
    ("bad.jsonl", '{"source": "a", "target": "b"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object"),
    ("bad.jsonl", '{"source": "a", "target": 3}\n', r"bad\.jsonl:1: target must be a string"),
    ("bad.jsonl", '{"source": " ", "target": "b"}\n', r"bad\.jsonl:1: empty source"),
    ("bad.tsv", "a\tb\nc\td\te\n", r"bad\.tsv:2: expected 2 columns \(source, target\), got 3"),
    ("bad.tsv", "a\tb\nonly-one\n", r"bad\.tsv:2: expected 2 columns"),
    ("bad.csv", "a,b\nc,d\n\ne,\n", r"bad\.csv:4: empty target"),
    ("bad.csv", 'a,b\n"multi\nline",x\ny,z,w\n', r"bad\.csv:4: expected 2 columns"),
    ("empty.jsonl", "\n\n", r"empty\.jsonl: no pairs"),
    ("data.xlsx", "x", r"unknown data format '\.xlsx'"),
    ("data.parquet", "x", r"data\.parquet: not a readable Parquet file"),
])
def test_bad_rows_name_file_and_line(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message):
        read_pairs(write(tmp_path, name, text))


def test_bad_lists_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data\[1\]: expected a \(source, target\) pair"):
        read_pairs([("a", "b"), ("c",)])
    with pytest.raises(DataError, match="no such file"):
        read_pairs(str(tmp_path / "nope.jsonl"))


def test_tokenize_truncates_keeps_eos_and_counts():
    tok = char_tokenizer("bart")
    examples, report = tokenize_pairs([("abcdefgh", "abc"), ("ab", "abcdefghij")], tok, 6, 5,
                                      decoder_start_token_id=tok.eos_token_id)
    assert report.truncated_sources == 1 and report.truncated_targets == 1
    assert len(examples[0].input_ids) == 6 and examples[0].input_ids[-1] == tok.eos_token_id
    assert examples[1].labels[-1] == tok.eos_token_id and len(examples[1].labels) == 5
    assert examples[1].labels[0] == tok.bos_token_id  # BART's labels keep <s>; its start token is </s>


def test_bert_targets_lose_leading_cls():
    tok = char_tokenizer("bert")
    examples, _ = tokenize_pairs([("ab", "cd")], tok, 16, 16, decoder_start_token_id=tok.cls_token_id)
    assert examples[0].input_ids[0] == tok.cls_token_id
    assert examples[0].labels == tok("cd")["input_ids"][1:]  # "c d [SEP]": the shift puts [CLS] first


def test_collator_pads_shifts_and_masks():
    tok = char_tokenizer("t5")
    examples, _ = tokenize_pairs([("abc", "x"), ("a", "xyz")], tok, 16, 16, decoder_start_token_id=tok.pad_token_id)
    batch = Collator(tok.pad_token_id, tok.pad_token_id)(examples)
    assert batch["labels"][0].tolist()[2:] == [IGNORE_INDEX, IGNORE_INDEX]
    assert batch["decoder_input_ids"][:, 0].tolist() == [tok.pad_token_id] * 2
    assert batch["decoder_input_ids"][1, 1:].tolist() == batch["labels"][1, :-1].tolist()
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_length_grouped_batches_are_deterministic_and_complete():
    lengths = [(i * 37) % 23 + 1 for i in range(103)]
    sampler = LengthGroupedBatches(lengths, batch_size=8, seed=3, mega=4)
    epoch0, again, epoch1 = sampler.batches(0), sampler.batches(0), sampler.batches(1)
    assert epoch0 == again
    assert epoch0 != epoch1
    for batches in (epoch0, epoch1):
        assert sorted(i for b in batches for i in b) == list(range(103))
    assert len(epoch0) == len(sampler) == 13
    # grouping cuts padding: the summed (max length in batch) is lower than with plain shuffling
    plain = LengthGroupedBatches(lengths, batch_size=8, seed=3, group_by_length=False).batches(0)

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(epoch0) < padded(plain)
