"""Two ranks on CPU with gloo equal one process with the same global batch; resume across 2 ranks; rank-0 files."""
import faulthandler
import glob
import json
import os
import re
import shutil
import socket
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from conftest import SPELLING

from finetune import Engine, TrainConfig
from finetune.models import tiny_bart
from finetune.train.checkpoint import CheckpointError

DATA = SPELLING * 4  # 24 pairs: 3 global batches of 8 per epoch
# 41 pairs of varied lengths (an odd count: a last group of one) for the token-budget test
VARIED = [(" ".join(["word"] * (1 + i % 9)), " ".join(["w"] * (1 + i % 4))) for i in range(41)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make(method: str, dropout: float = 0.0):
    model, tok = tiny_bart(d_model=32, seed=0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    if method == "bitfit":
        from finetune import bitfit

        bitfit(model)
    elif method == "lora":
        from finetune.methods.lora import apply_lora

        apply_lora(model, r=4, alpha=8, dropout=dropout)
        with torch.no_grad():  # B != 0 so that A's gradients are not all zero either
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model, tok


def config(out, batch_size, **kw):
    return TrainConfig(**{**dict(lr=3e-3, batch_size=batch_size, epochs=2, grad_accum=2, log_every=1, precision="fp32",
                                 dist_timeout_s=120, progress=False, save_model=False, output_dir=str(out)), **kw})


HANG_S = 150  # a rank still running after this dumps every thread's stack and exits: a hang fails, never stalls CI
STACKS = None  # in a rank: the file its stacks go to


def worker(rank, world, port, method, out, kw, resume):
    global STACKS
    STACKS = open(os.path.join(out, f"stacks-rank{rank}.txt"), "w")  # kept open: faulthandler writes to its fd
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=STACKS)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model, tok = make(method, kw.pop("dropout", 0.0))
    train_file = kw.pop("train_file", None)
    engine = Engine(model, tok, config(out, 4, **kw))
    shapes, collate = [], engine.collate  # each micro-batch this rank trains on: (examples, padded tokens)
    engine.collate = lambda ex: shapes.append((ex, collate(ex))) or shapes[-1][1]
    engine.fit(train_file or (DATA if not kw.get("max_tokens") else VARIED), resume=resume)
    with open(os.path.join(out, f"shapes-rank{rank}.json"), "w") as f:
        json.dump([(len(ex), b["input_ids"].numel() + b["labels"].numel(), [e.input_ids for e in ex])
                   for ex, b in shapes], f)
    if rank == 0 and not kw.get("fsdp"):
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out, "final.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    STACKS.flush()
    # Leave without freeing this function's objects: the rare hang these tests retry was a rank stuck after its
    # work was done, inside the call that had run this function (its DDP / gloo objects being freed), with no
    # Python frame left (the watchdog's stacks in the CI warning).
    os._exit(0)


class Hung(Exception):
    pass


def run_ranks(out, method, resume, kw):
    ctx = mp.start_processes(worker, args=(2, free_port(), method, str(out), kw, resume), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + HANG_S + 60
    while not ctx.join(timeout=5):  # raises when a rank fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise Hung(f"2-rank run still going after {HANG_S + 60} s: killed")


def hung(err: Exception) -> bool:
    """A rank stuck (killed by its watchdog, or a collective past dist_timeout_s), not a rank that failed."""
    if isinstance(err, Hung | mp.ProcessExitedException):
        return True
    return isinstance(err, mp.ProcessRaisedException) and re.search(r"(?i)timed? ?out", str(err)) is not None


def launch(out, method, resume=None, **kw):
    """Two gloo ranks on this CPU. A run that hangs is retried once, with a warning that carries the first
    error and the stacks each rank's watchdog wrote. Two full CI runs (of about six) hung here; about 20 runs
    of this file or its tests alone never did, and the cause is not found yet. A rank that *fails* is never
    retried."""
    for attempt in (1, 2):
        if resume is None:
            shutil.rmtree(out, ignore_errors=True)  # a retry starts clean
        os.makedirs(out, exist_ok=True)
        try:
            run_ranks(out, method, resume, kw)
            break
        except Exception as err:  # `hung` tells a stuck run from a failed one
            if attempt == 2 or not hung(err):
                raise
            stacks = "".join(open(p).read() for p in sorted(glob.glob(os.path.join(out, "stacks-rank*.txt"))))
            warnings.warn(f"2-rank run hung, retrying once: {str(err)[-1500:]}\n{stacks[-6000:]}", stacklevel=2)
    if kw.get("fsdp"):
        return None
    return torch.load(os.path.join(out, "final.pt"), weights_only=True)


def losses(out):
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("method,pack", [("full", False), ("bitfit", False), ("lora", False), ("full", True)])
def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, method, pack):
    """pack=True: each rank packs its share of the global batch; the one process does not pack."""
    two = launch(tmp_path / "two", method, pack=pack)
    model, tok = make(method)
    Engine(model, tok, config(tmp_path / "one", 8)).fit(DATA)
    one_losses, two_losses = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in one_losses] == [s for s, _ in two_losses] == list(range(1, 5))  # rank 0 writes alone
    for (_, a), (_, b) in zip(one_losses, two_losses):
        assert a == pytest.approx(b, abs=1e-5)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(two[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_token_budget_batches_shard_evenly_over_two_ranks(tmp_path):
    """max_tokens under torchrun: both ranks take the same number of steps, each rank's micro-batch stays within the
    budget, together they train on every example once an epoch (41 examples: the odd one joins a batch), and each
    step's log record counts the pairs of both ranks."""
    launch(tmp_path, "full", max_tokens=96, max_source_length=48, max_target_length=24, grad_accum=1)
    ranks = [json.load(open(tmp_path / f"shapes-rank{r}.json")) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    assert all(0 < n and tokens <= 96 for rank in ranks for n, tokens, _ in rank)
    assert sum(n for rank in ranks for n, _, _ in rank) == 2 * len(VARIED)  # two epochs
    assert len({n for n, _, _ in ranks[0]}) > 1
    logged = [r["samples"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["split"] == "train"]
    assert logged == [a[0] + b[0] for a, b in zip(*ranks)]  # the pairs of both ranks, not rank 0's count x 2


def eval_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model, tok = make("full")
    engine = Engine(model, tok, config(out, 4, eval_batch_size=3, num_beams=2, max_new_tokens=6))
    result = engine.evaluate(VARIED[:17])
    with open(os.path.join(out, f"eval-rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)


def test_evaluation_is_split_across_ranks_with_the_figures_of_one_process(tmp_path):
    """Each rank generates every other batch (17 pairs in 6 batches of 3); both get the metrics of all of them,
    equal to one process's, and rank 0 writes the predictions of every pair."""
    mp.start_processes(eval_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    model, tok = make("full")
    one = Engine(model, tok, config(tmp_path / "one", 4, eval_batch_size=3, num_beams=2, max_new_tokens=6))
    want = one.evaluate(VARIED[:17])
    got = [json.load(open(tmp_path / f"eval-rank{r}.json")) for r in (0, 1)]
    assert got[0] == got[1]
    assert got[0]["n"] == 17 and got[0]["loss"] == pytest.approx(want["loss"], abs=1e-6)
    assert {k: v for k, v in got[0].items() if k != "loss"} == {k: v for k, v in want.items() if k != "loss"}
    rows = [json.loads(line) for line in open(tmp_path / "eval_predictions.jsonl")]
    assert [r["prediction"] for r in rows] == [json.loads(line)["prediction"]
                                              for line in open(tmp_path / "one" / "eval_predictions.jsonl")]


def finished_copy(run, to):
    """A copy of a finished run's folder without its final outputs: what the same run again would leave to resume
    from (every run here is deterministic), for the price of a copy instead of a 2-rank launch."""
    shutil.copytree(run, to)
    for name in ("model", "final.pt", ".lock"):
        path = to / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return to


def test_checkpoint_from_two_ranks_resumes_on_two_exactly(tmp_path):
    reference = launch(tmp_path / "a", "full", dropout=0.1, save_every=1, keep_last=10)
    run = finished_copy(tmp_path / "a", tmp_path / "b")  # the same run again would write the same checkpoints
    resumed = launch(run, "full", resume=str(run / "checkpoints" / "step-00000002"), dropout=0.1, save_every=1,
                     keep_last=10)
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
    # a different world size is refused, saying why
    model, tok = make("full", 0.1)
    with pytest.raises(CheckpointError, match="written by 2 process"):
        Engine(model, tok, config(run, 4, save_every=1, keep_last=10)).fit(DATA, resume="latest")


def test_a_stream_is_sharded_over_two_ranks_and_resumes_on_two_exactly(tmp_path):
    """streaming=True under torchrun: rank r tokenises and trains on rows r, r+2, ... of the file (together: every
    row once a pass, never one row on both); a 2-rank checkpoint resumes both ranks' streams bit-exactly."""
    rows = [(f"{s} {i}", f"{t} {i}") for i in range(10) for s, t in SPELLING]  # 60 rows: 30 a rank, one pass
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in rows))
    kw = dict(train_file=str(path), streaming=True, max_steps=4, epochs=1, stream_buffer=16, save_every=1, keep_last=10,
              grad_accum=1, dropout=0.1)
    reference = launch(tmp_path / "a", "full", **kw)
    _, tok = make("full")
    for r in (0, 1):
        seen = [tuple(ids) for _, _, batch in json.load(open(tmp_path / "a" / f"shapes-rank{r}.json")) for ids in batch]
        assert len(seen) == 4 * 4 and len(set(seen)) == len(seen)  # 4 steps of 4 examples a rank, none twice
        mine = {tuple(tok(s)["input_ids"]) for s, _ in rows[r::2]}
        assert set(seen) <= mine, r  # only this rank's shard
    run = finished_copy(tmp_path / "a", tmp_path / "b")
    resumed = launch(run, "full", resume=str(run / "checkpoints" / "step-00000002"), **kw)
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    """FSDP2 (fully_shard) on CPU with gloo: same losses, and the gathered saved model equals one process's."""
    from transformers import AutoModelForSeq2SeqLM

    launch(tmp_path / "two", "full", fsdp=True, save_model=True)
    model, tok = make("full")
    Engine(model, tok, config(tmp_path / "one", 8)).fit(DATA)
    for (sa, a), (sb, b) in zip(losses(tmp_path / "one"), losses(tmp_path / "two")):
        assert sa == sb and a == pytest.approx(b, abs=1e-5)
    saved = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "two" / "model"))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_fsdp_checkpoints_match_ddp_and_resume_exactly(tmp_path):
    """FSDP checkpoints hold the full model and optimizer state in the same files as DDP's, and resume exactly."""
    from safetensors.torch import load_file

    common = dict(save_every=1, keep_last=10, dropout=0.1, save_model=True)
    launch(tmp_path / "ddp", "full", **common)
    launch(tmp_path / "a", "full", fsdp=True, **common)
    for name in ("model.safetensors", "optimizer.safetensors"):
        ddp = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-00000002" / name))
        fsdp = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000002" / name))
        assert fsdp.keys() == ddp.keys(), name
        for key, tensor in ddp.items():
            torch.testing.assert_close(fsdp[key], tensor, atol=1e-5, rtol=0, msg=f"{name}: {key}")
    run = finished_copy(tmp_path / "a", tmp_path / "b")
    launch(run, "full", resume=str(run / "checkpoints" / "step-00000002"), fsdp=True, **common)
    reference = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    resumed = load_file(str(run / "model" / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
