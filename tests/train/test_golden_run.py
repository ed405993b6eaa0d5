"""A run with a fixed seed gives the same losses and weights, bit for bit, as the recorded one.

The record (tests/train/golden_runs.json) was written by the engine before it was restructured into its current
modules; it pins the whole step: data order, label shift, dropout draws, fused and plain loss, accumulation,
clipping, AdamW, schedule. Floating-point results can differ between CPUs (their matmul kernels sum in other
orders), so the comparison is exact on a CPU like the one that wrote the record and within 1e-5 elsewhere.

Rewrite the record (only on purpose, after a change meant to alter the numbers):
    FINETUNE_WRITE_GOLDEN=1 python -m pytest tests/train/test_golden_run.py
"""
import hashlib
import json
import os
import platform

import pytest
import torch

from finetune import Engine, TrainConfig
from finetune.methods import apply_method
from finetune.models import tiny_bart, tiny_bert2bert, tiny_t5

RECORD = os.path.join(os.path.dirname(__file__), "golden_runs.json")
DATA = [(f"teh wrod {i}", f"the word {i}") for i in range(20)] + [("recieve", "receive"), ("adress", "address")]
CASES = {
    "bart-full-fused": (tiny_bart, "full", {"fused_loss": True}),
    "bart-lora-plain": (tiny_bart, "lora", {"fused_loss": False}),
    "t5-full-accum": (tiny_t5, "full", {"grad_accum": 2, "label_smoothing": 0.1}),
    "bert2bert-bitfit": (tiny_bert2bert, "bitfit", {}),
}


def cpu_signature() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx"))))
                    break
    except OSError:
        pass
    return f"{platform.machine()} {flags} torch {torch.__version__.split('+')[0]} threads {torch.get_num_threads()}"


def run(name, tmp_path):
    build, method, extra = CASES[name]
    model, tok = build(d_model=32) if build is not tiny_bert2bert else build(hidden=32)
    for module in model.modules():  # dropout on: the random draws are part of what is pinned
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    apply_method(model, method)
    # optimizer="adamw": the record was written with AdamW for every family; T5's default is now Adafactor
    config = TrainConfig(lr=3e-3, batch_size=4, epochs=2, warmup_ratio=0.2, log_every=1, seed=7, progress=False,
                         precision="fp32", optimizer="adamw",
                         save_model=False, output_dir=str(tmp_path / name), **extra)
    history = Engine(model, tok, config).fit(DATA)
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode() + tensor.detach().float().contiguous().numpy().tobytes())
    return {"losses": [r["loss"] for r in history["train"]], "weights_sha256": digest.hexdigest(),
            "weights_sum": float(sum(float(t.double().abs().sum()) for t in model.state_dict().values()))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixed_seed_run_matches_the_record(name, tmp_path):
    got = run(name, tmp_path)
    if os.environ.get("FINETUNE_WRITE_GOLDEN"):
        record = json.load(open(RECORD)) if os.path.exists(RECORD) else {}
        record["cpu"] = cpu_signature()
        record[name] = got
        with open(RECORD, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        pytest.skip("record written")
    record = json.load(open(RECORD))
    want = record[name]
    assert len(got["losses"]) == len(want["losses"])
    if record["cpu"] == cpu_signature():
        assert got["losses"] == want["losses"]  # bit for bit
        assert got["weights_sha256"] == want["weights_sha256"]
    else:
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5, abs=1e-6)
        assert got["weights_sum"] == pytest.approx(want["weights_sum"], rel=1e-5)
