"""Data at any size (finetune.data.sources, finetune.data.corpus, finetune.data.stream): every source format, bad rows named by
file and line in each, the tokenised cache (hit, invalidation), the old and new paths bit-identical, streams
resumed bit-exactly and sharded over ranks."""
import contextlib
import csv
import json
import os
import signal

import pytest
import torch
from conftest import SPELLING

from finetune import Engine, TrainConfig
from finetune.data.corpus import load
from finetune.data.feed import prefetched
from finetune.data.pairs import DataError, read_pairs
from finetune.models import char_tokenizer, tiny_bart

pa = pytest.importorskip("pyarrow")
PAIRS = [(f"{s} {i}", f"{t} {i}") for i in range(40) for s, t in SPELLING]  # 240 pairs


def write_jsonl(path, pairs, fields=("source", "target")):
    with open(path, "w", encoding="utf-8") as f:
        for s, t in pairs:
            f.write(json.dumps({fields[0]: s, fields[1]: t}) + "\n")
    return str(path)


def write_parquet(path, pairs, fields=("source", "target")):
    import pyarrow.parquet as pq

    pq.write_table(pa.table({fields[0]: [s for s, _ in pairs], fields[1]: [t for _, t in pairs]}), path,
                   row_group_size=50)
    return str(path)


def write_every_format(folder, pairs):
    folder.mkdir(exist_ok=True)
    paths = {"jsonl": write_jsonl(folder / "a.jsonl", pairs), "parquet": write_parquet(folder / "a.parquet", pairs)}
    with open(folder / "a.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("source", "target"), *pairs])
    with open(folder / "a.tsv", "w", encoding="utf-8") as f:
        f.write("".join(f"{s}\t{t}\n" for s, t in pairs))
    with open(folder / "a.json", "w", encoding="utf-8") as f:
        json.dump([{"source": s, "target": t} for s, t in pairs], f)
    paths.update(csv=str(folder / "a.csv"), tsv=str(folder / "a.tsv"), json=str(folder / "a.json"))
    shards = folder / "shards"
    shards.mkdir()
    for k in range(3):
        write_jsonl(shards / f"part-{k:03d}.jsonl", pairs[k * 80:(k + 1) * 80])
    paths["shards"] = str(shards)
    return paths


def config(tmp_path, **kw):
    base = dict(max_source_length=16, max_target_length=16, num_proc=2, cache_dir=str(tmp_path / "cache"))
    return TrainConfig(**{**base, **kw})


def test_every_format_gives_the_same_pairs_and_ids(tmp_path):
    tok = char_tokenizer("bart")
    paths = write_every_format(tmp_path / "data", PAIRS)
    _, reference = load(PAIRS, tok, config(tmp_path), 2)  # a Python list: tokenised in memory
    assert reference.origin == "tokenised in memory"
    for kind, path in paths.items():
        pairs, examples = load(path, tok, config(tmp_path), 2, kind)
        assert list(pairs) == PAIRS, kind
        assert [examples[i] for i in range(len(examples))] == [reference[i] for i in range(len(reference))], kind
        assert examples.fingerprint == reference.fingerprint, kind
        assert examples.source_lengths.dtype.name == "int32"
        assert read_pairs(path) == PAIRS, kind  # the in-memory reader, same rows


def test_saved_datasets_and_dataset_objects(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = char_tokenizer("bart")
    ds = datasets.Dataset.from_dict({"source": [s for s, _ in PAIRS], "target": [t for _, t in PAIRS]})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    _, reference = load(PAIRS, tok, config(tmp_path), 2)
    for data in (ds, f"hf:{tmp_path / 'saved'}", str(tmp_path / "saved"), f"hf:{tmp_path / 'dict' / 'train'}"):
        pairs, examples = load(data, tok, config(tmp_path), 2)
        assert list(pairs) == PAIRS and examples.fingerprint == reference.fingerprint, data
    with pytest.raises(DataError, match=r"holds a DatasetDict with splits \['train'\]; name one: hf:.*dict/train"):
        load(f"hf:{tmp_path / 'dict'}", tok, config(tmp_path), 2)
    bad = datasets.Dataset.from_dict({"source": ["a", "b", "c"], "target": ["x", "", "z"]})
    with pytest.raises(DataError, match=r"dataset row \[1\]: empty target"):
        load(bad, tok, config(tmp_path), 2)
    with pytest.raises(DataError, match=r"missing column\(s\) \['source'\] \(have \['text', 'target'\]\)"):
        load(bad.rename_column("source", "text"), tok, config(tmp_path), 2)
    with pytest.raises(DataError, match=r"a DatasetDict of the splits \['train'\]: pass one split"):
        load(datasets.DatasetDict({"train": ds}), tok, config(tmp_path), 2)
    cached = load(str(tmp_path / "saved"), tok, config(tmp_path), 2)[1]
    assert cached.dataset()[3]["input_ids"] == reference[3].input_ids  # the cache is a datasets Arrow file


BAD = [  # (file name, text, message): one bad row after good ones, in every format
    ("bad.jsonl", '{"source": "a", "target": "b"}\n{"source": "a", \n', r"bad\.jsonl:2: invalid JSON"),
    ("bad.jsonl", '{"source": "a", "target": "b"}\n\n{"source": "a"}\n',
     r"bad\.jsonl:3: missing field\(s\) \['target'\]"),
    ("bad.tsv", "a\tb\nc\td\te\n", r"bad\.tsv:2: expected 2 columns \(source, target\), got 3"),
    ("bad.csv", 'a,b\n"multi\nline",x\ny,\n', r"bad\.csv:4: empty target"),
    ("bad.csv", 'a,b\nc,"never closed\nd,e\n', r"bad\.csv:2: a quote \(\"\) opened on this line is never closed"),
    ("bad.json", '[{"source": "a", "target": "b"}, {"source": 1, "target": "b"}]', r"bad\.json: item \[1\]: source "
     "must be a string"),
]


@pytest.mark.parametrize("name,text,message", BAD)
@pytest.mark.parametrize("num_proc", [1, 2])
def test_bad_rows_are_named_by_file_and_line(tmp_path, name, text, message, num_proc):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load(str(path), char_tokenizer("bart"), config(tmp_path, num_proc=num_proc), 2)
    assert not os.listdir(tmp_path / "cache")  # nothing half-written is left to be taken for a cache


def test_bad_row_deep_in_a_large_file_and_other_bad_inputs(tmp_path):
    tok = char_tokenizer("bart")
    path = tmp_path / "big.jsonl"
    write_jsonl(path, PAIRS * 50)  # 12,000 rows: several chunks in flight
    with open(path, "ab") as f:
        f.write(b'{"source": "caf\xe9", "target": "x"}\n')
    with pytest.raises(DataError, match=r"big\.jsonl:12001: not UTF-8 text \(byte 0xe9 at column 16"):
        load(str(path), tok, config(tmp_path), 2)
    table = tmp_path / "t.parquet"
    write_parquet(table, PAIRS[:10] + [("x", " ")] + PAIRS[:10])
    with pytest.raises(DataError, match=r"t\.parquet: row 11: empty target"):
        load(str(table), tok, config(tmp_path), 2)
    write_parquet(tmp_path / "f.parquet", PAIRS[:3], fields=("typo", "fix"))
    with pytest.raises(DataError, match=r"f\.parquet: missing column\(s\) \['source', 'target'\] \(have \['typo', "
                                         r"'fix'\]\)"):
        load(str(tmp_path / "f.parquet"), tok, config(tmp_path), 2)
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "a.jsonl", PAIRS[:3])
    write_parquet(tmp_path / "mixed" / "b.parquet", PAIRS[:3])
    with pytest.raises(DataError, match=r"mixed: holds shards of several formats \['\.jsonl', '\.parquet'\]"):
        load(str(tmp_path / "mixed"), tok, config(tmp_path), 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: is a folder with no data files"):
        load(str(tmp_path / "empty"), tok, config(tmp_path), 2)
    with pytest.raises(DataError, match=r"hf:.*nothing: no such|nothing: not a folder written by datasets"):
        load(f"hf:{tmp_path / 'nothing'}", tok, config(tmp_path), 2)


def test_the_cache_is_hit_and_invalidated(tmp_path):
    tok = char_tokenizer("bart")
    path = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    first = load(path, tok, config(tmp_path), 2)[1]
    assert "tokenised in 1 process(es) (num_proc 2: " in first.origin and "cached in" in first.origin  # 1 chunk
    again = load(path, tok, config(tmp_path), 2)[1]
    assert again.origin.startswith("cache hit") and "not tokenised again" in again.origin
    assert again.fingerprint == first.fingerprint
    assert len(os.listdir(tmp_path / "cache")) == 1
    changes = {"another tokenizer": (path, char_tokenizer("t5"), config(tmp_path), 0),
               "other lengths": (path, tok, config(tmp_path, max_source_length=8), 2),
               "other fields": (path, tok, config(tmp_path, source_field="target", target_field="source"), 2),
               "another decoder start": (path, tok, config(tmp_path), 1)}
    for what, args in changes.items():
        assert not load(*args)[1].origin.startswith("cache hit"), what
    write_jsonl(path, PAIRS[:-1] + [("teh end", "the end")])  # the file changed (size and modification time)
    changed = load(path, tok, config(tmp_path), 2)[1]
    assert not changed.origin.startswith("cache hit") and changed.pair(len(changed) - 1) == ("teh end", "the end")
    off = load(path, tok, config(tmp_path, cache_data=False), 2)[1]
    assert off.origin == "tokenised in memory" and off.fingerprint == changed.fingerprint


def test_prefetch_keeps_order_and_raises_where_the_producer_failed():
    assert list(prefetched(iter(range(100)), 3)) == list(range(100))

    def failing():
        yield 1
        raise DataError("x.jsonl:7: bad")

    got = []
    with pytest.raises(DataError, match="x.jsonl:7"):
        for item in prefetched(failing(), 2):
            got.append(item)
    assert got == [1]
    stream = prefetched(iter(range(10**6)), 2)
    assert next(stream) == 0
    stream.close()  # stops the producer thread


def train_cfg(out, **kw):
    base = dict(lr=3e-3, batch_size=8, epochs=2, log_every=1, progress=False, save_model=False, output_dir=str(out),
                max_source_length=24, max_target_length=24, num_proc=2)
    return TrainConfig(**{**base, **kw})


def losses(out):
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_old_and_new_data_paths_train_bit_identically(tmp_path, prefetch, capsys):
    """A Python list (tokenised in memory, collated on the training thread: the old path) and the same pairs
    from a file (tokenised in workers, cached, collated ahead): the same losses and weights, bit for bit."""
    path = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    runs = {}
    for name, data, kw in (("old", PAIRS, dict(prefetch=0)), ("new", path, dict(prefetch=prefetch)),
                           ("hit", path, dict(prefetch=prefetch, progress=True))):
        torch.manual_seed(0)
        model, tok = tiny_bart(d_model=32, layers=1)
        Engine(model, tok, train_cfg(tmp_path / name, **kw)).fit(data, eval=PAIRS[:12])
        runs[name] = (losses(tmp_path / name), {k: v.clone() for k, v in model.state_dict().items()})
    assert len(runs["old"][0]) == 60
    for name in ("new", "hit"):
        assert runs[name][0] == runs["old"][0], name
        assert all(torch.equal(runs[name][1][k], v) for k, v in runs["old"][1].items()), name
    assert "train: 240 examples; truncated: 0 sources, 0 targets (cache hit" in capsys.readouterr().out


def stream_cfg(out, **kw):
    return train_cfg(out, streaming=True, max_steps=40, epochs=1, stream_buffer=50, save_every=4, keep_last=10, **kw)


@pytest.mark.parametrize("budget", [None, 160])
def test_a_stream_killed_and_resumed_is_bit_exact(tmp_path, budget, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", PAIRS)  # 240 rows: 5 buffers of 50 a pass, 40 steps: 2 passes
    extra = dict(max_tokens=budget) if budget else {}
    torch.manual_seed(0)
    model, tok = tiny_bart(d_model=32, layers=1)
    Engine(model, tok, stream_cfg(tmp_path / "a", progress=True, **extra)).fit(path)
    reference = losses(tmp_path / "a")
    assert len(reference) == 40
    log = capsys.readouterr().out
    assert "streamed" in log and "stream pass 1 buffer 0" in log

    def stop_at_6(engine, stats):
        if engine.global_step == 6:  # mid-buffer, not at a save_every step
            os.kill(os.getpid(), signal.SIGTERM)

    torch.manual_seed(0)
    model, tok = tiny_bart(d_model=32, layers=1)
    with pytest.raises(SystemExit):
        Engine(model, tok, stream_cfg(tmp_path / "b", **extra)).fit(path, on_step=stop_at_6)
    state = json.load(open(tmp_path / "b" / "checkpoints" / "step-00000006" / "state.json"))
    assert set(state["stream"][0]) == {"pass", "buffer", "batch", "padding"}
    torch.manual_seed(1)  # a new process: other weights, which the checkpoint replaces
    model, tok = tiny_bart(d_model=32, layers=1)
    Engine(model, tok, stream_cfg(tmp_path / "b", **extra)).fit(path, resume="latest")
    assert losses(tmp_path / "b") == reference  # bit for bit, before and after the interruption


def test_a_stream_needs_declared_steps(tmp_path):
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(streaming=True)
    with pytest.raises(ValueError, match="TrainConfig.epochs=3: a streamed run lasts max_steps"):
        TrainConfig(streaming=True, max_steps=5, epochs=3)
    model, tok = tiny_bart(d_model=32, layers=1)
    datasets = pytest.importorskip("datasets")
    stream = datasets.Dataset.from_dict({"source": ["a"], "target": ["b"]}).to_iterable_dataset()
    with pytest.raises(ValueError, match="max_steps"):
        Engine(model, tok, train_cfg(tmp_path)).fit(stream)


@pytest.mark.parametrize("job", ["codespell", "code-summary"])
def test_the_real_jobs_train_bit_identically_on_the_old_and_new_paths(tmp_path, job):
    """The main job (MiniLM bert2bert on codespell) and the code-summary job, on a slice: their pairs as a Python
    list (the old path) and as a JSONL file (workers, Arrow cache, prefetch thread) give the same losses."""
    from finetune.data.builtin import code_summary_pairs, codespell_pairs
    from finetune.methods import new_tensor_lr
    from finetune.models import bert2bert_by_name, set_dropout

    if job == "codespell":
        pairs = codespell_pairs("train", limit=96, seed=0)
        shape, steps = dict(batch_size=16, max_source_length=32, max_target_length=32), 4
    else:
        pairs = code_summary_pairs("train", limit=32, seed=0)
        shape, steps = dict(max_tokens=2048, max_source_length=128, max_target_length=48), 2
    path = write_jsonl(tmp_path / f"{job}.jsonl", pairs)
    runs = {}
    for name, data, prefetch in (("old", pairs, 0), ("new", path, 2)):
        torch.manual_seed(0)  # the new cross-attention's initial weights
        built = bert2bert_by_name("minilm")
        set_dropout(built.model, 0.1)  # dropout on: the training thread's random stream must be the same too
        cfg = TrainConfig(lr=1e-4, lr_overrides=new_tensor_lr(built.new_parameters, 1e-3), max_steps=steps, epochs=1,
                          log_every=1, progress=False, save_model=False, output_dir=str(tmp_path / name),
                          prefetch=prefetch, num_proc=2, **shape)
        Engine(built.model, built.tokenizer, cfg).fit(data)
        runs[name] = losses(tmp_path / name)
    assert len(runs["old"]) == steps and runs["new"] == runs["old"]


def test_noise_and_resume_on_the_cached_path_match_the_list_path(tmp_path):
    """BART noise (fresh each epoch) and an interrupted, resumed run on the file path: the list path's losses."""
    from finetune import NoiseConfig

    path = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    noise = NoiseConfig(mask_rate=0.3)

    def run(out, data, **kw):
        torch.manual_seed(0)
        model, tok = tiny_bart(d_model=32, layers=1)
        return Engine(model, tok, train_cfg(out, save_every=7, keep_last=10), noise=noise).fit(data, **kw)

    run(tmp_path / "list", PAIRS)

    def stop_at_40(engine, stats):
        if engine.global_step == 40:  # in the second epoch
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit):
        run(tmp_path / "file", path, on_step=stop_at_40)
    run(tmp_path / "file", path, resume="latest")
    assert losses(tmp_path / "file") == losses(tmp_path / "list")


def test_an_iterable_dataset_streams_like_the_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    stream = datasets.Dataset.from_dict({"source": [s for s, _ in PAIRS], "target": [t for _, t in PAIRS]})
    for name, data in (("file", path), ("iterable", stream.to_iterable_dataset(num_shards=2))):
        torch.manual_seed(0)
        model, tok = tiny_bart(d_model=32, layers=1)
        cfg = stream_cfg(tmp_path / name)
        cfg.streaming = name == "file"  # an IterableDataset is a stream without being told
        Engine(model, tok, cfg).fit(data)
    assert losses(tmp_path / "iterable") == losses(tmp_path / "file")

    def stop_at_6(engine, stats):
        if engine.global_step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    for kw in (dict(on_step=stop_at_6), dict(resume="latest")):  # an IterableDataset resumes exactly too
        torch.manual_seed(0)
        model, tok = tiny_bart(d_model=32, layers=1)
        with pytest.raises(SystemExit) if "on_step" in kw else contextlib.nullcontext():
            Engine(model, tok, stream_cfg(tmp_path / "resumed")).fit(stream.to_iterable_dataset(num_shards=2), **kw)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "file")


def test_run_files_pass_paths_on_and_take_hf_paths(tmp_path):
    from finetune.run_build import load_data

    path = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    assert load_data(path, None, 0, "source", "target") == path  # read (and cached) by the engine
    assert load_data(path, 5, 0, "source", "target") == PAIRS[:5]
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_data(str(tmp_path / "nope.jsonl"), None, 0, "source", "target")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"source": ["a"], "target": ["b"]}).save_to_disk(str(tmp_path / "saved"))
    assert load_data(f"hf:{tmp_path / 'saved'}", None, 0, "source", "target") == f"hf:{tmp_path / 'saved'}"
    assert read_pairs(f"hf:{tmp_path / 'saved'}") == [("a", "b")]


def test_a_damaged_cache_is_built_again_and_an_unwritable_one_is_named(tmp_path):
    tok = char_tokenizer("bart")
    path = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    first = load(path, tok, config(tmp_path), 2)[1]
    arrow = first.path
    with open(arrow, "r+b") as f:  # cut short, as a full disk or a killed copy leaves it
        f.truncate(os.path.getsize(arrow) // 2)
    again = load(path, tok, config(tmp_path), 2)[1]
    assert again.origin.startswith("the cache") and "was damaged" in again.origin and "cached in" in again.origin
    assert again.fingerprint == first.fingerprint and len(again) == len(PAIRS)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    with pytest.raises(DataError, match=r"TrainConfig.cache_dir: cannot write the tokenised data to .*not-a-folder"):
        load(path, tok, config(tmp_path, cache_dir=str(blocked)), 2)


def test_streaming_a_list_is_refused_naming_the_setting(tmp_path):
    model, tok = tiny_bart(d_model=32, layers=1)
    with pytest.raises(ValueError, match=r"TrainConfig.streaming: .* a list is in memory already"):
        Engine(model, tok, stream_cfg(tmp_path)).fit(PAIRS)


def test_a_stopped_run_stops_its_collating_thread(tmp_path):
    import threading

    def stop_at_3(engine, stats):
        if engine.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    model, tok = tiny_bart(d_model=32, layers=1)
    with pytest.raises(SystemExit):
        Engine(model, tok, train_cfg(tmp_path, save_every=100)).fit(PAIRS, on_step=stop_at_3)
    assert not [t for t in threading.enumerate() if t.name == "finetune-collate"]


def test_a_damaged_parquet_file_is_named_with_the_row_where_reading_stopped(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", PAIRS)  # row groups of 50
    raw = bytearray(open(path, "rb").read())
    middle = len(raw) // 2
    raw[middle:middle + 64] = b"\xff" * 64  # a row group's pages overwritten; the footer intact
    open(path, "wb").write(bytes(raw))
    with pytest.raises(DataError, match=r"t\.parquet: row \d+ on cannot be read \(OSError"):
        read_pairs(path)


def test_finetune_check_says_which_data_and_which_cache(tmp_path):
    from finetune.run_build import check_setup

    path = write_jsonl(tmp_path / "a.jsonl", PAIRS[:24])
    rows = []
    for _ in range(2):
        model, tok = tiny_bart(d_model=32, layers=1)
        report = check_setup(model, tok, train_cfg(tmp_path / "out", batch_size=4), path, steps=5)
        rows.append({name: detail for _, name, detail in report.rows}["data"])
    assert rows[0].startswith(f"training data {path}: 24 examples") and "cached in" in rows[0]
    assert "cache hit" in rows[1] and "not tokenised again" in rows[1]


def test_a_stream_of_shards_gives_each_rank_its_own_files(tmp_path):
    from finetune.data.stream import Stream

    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(4):
        write_jsonl(folder / f"part-{k}.jsonl", PAIRS[k * 60:(k + 1) * 60])
    cfg = train_cfg(tmp_path, streaming=True, max_steps=1, epochs=1)
    tok = char_tokenizer("bart")
    rows = {r: [(s, t) for _, s, t in Stream(str(folder), tok, cfg, 2, r, 2).rows()] for r in (0, 1)}
    assert rows[0] == PAIRS[0:60] + PAIRS[120:180] and rows[1] == PAIRS[60:120] + PAIRS[180:240]
    odd = [(s, t) for _, s, t in Stream(str(folder), tok, cfg, 2, 1, 3).rows()]  # 4 files, 3 ranks: by rows
    assert odd == PAIRS[1::3]


# --- what the cache and the shard folders must never do silently -----------------------------------------------

def test_compressed_shards_are_read_and_a_file_that_would_not_be_read_is_named(tmp_path):
    import bz2
    import gzip
    import lzma

    tok = char_tokenizer("bart")
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", PAIRS[:60])
    for k, (suffix, module) in enumerate(((".gz", gzip), (".bz2", bz2), (".xz", lzma)), start=1):
        with module.open(folder / f"part-{k}.jsonl{suffix}", "wt", encoding="utf-8") as f:
            f.write("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS[60 * k:60 * (k + 1)]))
    pairs, examples = load(str(folder), tok, config(tmp_path), 2)
    assert list(pairs) == PAIRS and len(examples) == len(PAIRS)  # every shard, in name order
    assert read_pairs(str(folder)) == PAIRS  # the in-memory path reads them alike
    (folder / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match=r"shards: holds 1 entry that would not be read as data: \['notes.txt'\]"):
        load(str(folder), tok, config(tmp_path), 2)
    (folder / "notes.txt").unlink()
    (folder / "part-9.jsonl.gz").write_bytes(gzip.compress(b'{"source": "a", "target": "b"}\n')[:-8])  # cut short
    with pytest.raises(DataError, match=r"part-9\.jsonl\.gz: cannot be decompressed"):
        load(str(folder), tok, config(tmp_path, cache_data=False), 2)


def test_a_zst_file_without_its_module_is_named(tmp_path):
    try:
        import zstandard  # noqa: F401
        pytest.skip("zstandard is installed here: .zst files are read")
    except ImportError:
        pass
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(DataError, match=r"a\.jsonl\.zst: reading \.zst files needs the zstandard package"):
        read_pairs(str(path))


def test_a_file_edited_in_place_with_its_size_and_time_restored_is_not_a_cache_hit(tmp_path):
    tok = char_tokenizer("bart")
    path = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    assert "inode-change time" in load(path, tok, config(tmp_path), 2)[1].origin  # the log says what the key holds
    before = os.stat(path)
    text = open(path, encoding="utf-8").read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace("teh cat 0", "teh cap 0", 1))  # the same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the modification time put back
    assert os.path.getsize(path) == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns
    pairs, examples = load(path, tok, config(tmp_path), 2)
    assert not examples.origin.startswith("cache hit") and pairs[0] == ("teh cap 0", "the cat 0")


@pytest.mark.parametrize("damage", ["one id", "16 bytes"])
def test_a_cache_file_damaged_in_place_is_built_again(tmp_path, damage):
    tok = char_tokenizer("bart")
    path = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    first = load(path, tok, config(tmp_path), 2)[1]
    ids = [list(first[i].input_ids) for i in range(len(first))]
    (folder,) = [p for p in (tmp_path / "cache").iterdir()]
    arrow = folder / "examples.arrow"
    data = bytearray(arrow.read_bytes())
    if damage == "one id":  # the int32 id of the first source's first character, changed by one
        at = bytes(data).index(int(ids[0][1]).to_bytes(4, "little"))
        data[at] ^= 1
    else:
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(16)
    arrow.write_bytes(bytes(data))
    again = load(path, tok, config(tmp_path), 2)[1]  # the log says it was damaged and tokenised again
    assert "damaged" in again.origin and "content digest" in again.origin
    assert [list(again[i].input_ids) for i in range(len(again))] == ids


def test_the_folders_of_killed_cache_builds_are_removed_and_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    tok = char_tokenizer("bart")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cache = tmp_path / "cache"
        for pid in (gone.pid, alive.pid):
            (cache / f"0123abcd.tmp-{pid}").mkdir(parents=True)
            (cache / f"0123abcd.tmp-{pid}" / "examples.arrow").write_bytes(b"partial")
        examples = load(write_jsonl(tmp_path / "a.jsonl", PAIRS), tok, config(tmp_path), 2)[1]
        left = sorted(p.name for p in cache.iterdir())
        assert f"0123abcd.tmp-{alive.pid}" in left and f"0123abcd.tmp-{gone.pid}" not in left
        assert "removed 1 folder(s) of killed builds" in examples.origin
    finally:
        alive.kill()
        alive.wait()


def test_num_proc_is_capped_at_the_cores_and_the_chunks(tmp_path):
    from finetune.data.corpus import default_num_proc

    tok = char_tokenizer("bart")
    path = write_jsonl(tmp_path / "a.jsonl", PAIRS)  # 240 rows: one chunk
    examples = load(path, tok, config(tmp_path, num_proc=1000), 2)[1]
    assert "tokenised in 1 process(es) (num_proc 1000: " in examples.origin
    big = write_jsonl(tmp_path / "big.jsonl", PAIRS * 40)  # 9,600 rows: 3 chunks
    examples = load(big, tok, config(tmp_path, num_proc=1000), 2)[1]
    workers = min(3, default_num_proc())
    assert f"tokenised in {workers} process(es) (num_proc 1000: " in examples.origin
