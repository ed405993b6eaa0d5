"""Checkpoints: exact resume, atomic writes, corruption fallback, refusal of mismatches, signals, sizes."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import SPELLING

from finetune import Engine, TrainConfig, bitfit
from finetune.methods.lora import apply_lora
from finetune.models import tiny_bart
from finetune.train.checkpoint import CheckpointError, find_checkpoint, list_checkpoints

DATA = SPELLING * 4  # 24 pairs: 6 batches of 4 per epoch


def cfg(out, **kw):
    base = dict(lr=3e-3, batch_size=4, epochs=2, warmup_ratio=0.1, log_every=1, save_every=3, keep_last=10,
                progress=False, save_model=False, output_dir=str(out))
    return TrainConfig(**{**base, **kw})


def fresh(dropout=0.1):
    model, tok = tiny_bart(d_model=32, layers=1)
    model.config.dropout = dropout  # dropout on: the RNG state must be restored too
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    return model, tok


def losses(out):
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_interrupt_and_resume_is_bit_exact(tmp_path):
    model, tok = fresh()
    Engine(model, tok, cfg(tmp_path / "a")).fit(DATA)
    reference = {n: p.clone() for n, p in model.state_dict().items()}

    model_b, tok = fresh()
    engine = Engine(model_b, tok, cfg(tmp_path / "b"))

    def interrupt_at_step_7(engine, stats):
        if engine.global_step == 7:  # mid-epoch 2, not at a save_every step
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        engine.fit(DATA, on_step=interrupt_at_step_7)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert list_checkpoints(tmp_path / "b" / "checkpoints") == ["step-00000003", "step-00000006", "step-00000007"]

    model_c, tok = fresh()  # a new process would start from fresh weights too
    Engine(model_c, tok, cfg(tmp_path / "b")).fit(DATA, resume="latest")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert a[step] == b[step], step  # bit for bit, before and after the interruption
    for name, tensor in model_c.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_incompatible_config_is_refused(tmp_path):
    model, tok = fresh()
    Engine(model, tok, cfg(tmp_path, max_steps=4)).fit(DATA)
    model2, tok2 = fresh()
    with pytest.raises(CheckpointError, match="config.lr was 0.003, is now 0.1; config.max_steps was 4, is now 5"):
        Engine(model2, tok2, cfg(tmp_path, max_steps=5, lr=0.1)).fit(DATA, resume="latest")


def test_keep_last_and_latest_pointer(tmp_path):
    model, tok = fresh()
    Engine(model, tok, cfg(tmp_path, save_every=2, keep_last=2)).fit(DATA)
    ckpts = tmp_path / "checkpoints"
    assert list_checkpoints(ckpts) == ["step-00000010", "step-00000012"]
    assert (ckpts / "latest").read_text().strip() == "step-00000012"
    assert not [n for n in os.listdir(ckpts) if n.startswith(".tmp")]


def test_truncated_checkpoint_is_detected_and_latest_falls_back(tmp_path):
    model, tok = fresh()
    Engine(model, tok, cfg(tmp_path, save_every=4)).fit(DATA)
    ckpts = tmp_path / "checkpoints"
    newest = ckpts / "step-00000012" / "optimizer.safetensors"
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.raises(CheckpointError, match="optimizer.safetensors: .* bytes, .* were written"):
        find_checkpoint(str(ckpts), str(ckpts / "step-00000012"))
    with pytest.warns(UserWarning, match="skipped a bad checkpoint.*falling back to .*step-00000008"):
        assert find_checkpoint(str(ckpts), "latest").endswith("step-00000008")
    flipped = ckpts / "step-00000008" / "model.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum differs"):
        find_checkpoint(str(ckpts), str(ckpts / "step-00000008"))


def test_half_written_checkpoint_is_never_latest(tmp_path):
    model, tok = fresh()
    Engine(model, tok, cfg(tmp_path, save_every=6)).fit(DATA)
    ckpts = tmp_path / "checkpoints"
    os.makedirs(ckpts / ".tmp-step-00000013")  # a crash mid-write leaves only a temporary folder
    assert find_checkpoint(str(ckpts), "latest").endswith("step-00000012")


def test_mismatched_model_and_trainable_set_are_refused(tmp_path):
    model, tok = fresh()
    Engine(model, tok, cfg(tmp_path, max_steps=3)).fit(DATA)
    other, tok2 = tiny_bart(d_model=64)
    with pytest.raises(CheckpointError, match="the model differs"):
        Engine(other, tok2, cfg(tmp_path, max_steps=3)).fit(DATA, resume="latest")
    frozen, tok3 = fresh()
    bitfit(frozen)
    with pytest.raises(CheckpointError, match="the trainable parameters differ"):
        Engine(frozen, tok3, cfg(tmp_path, max_steps=3)).fit(DATA, resume="latest")
    same, tok4 = fresh()
    with pytest.raises(CheckpointError, match="the training data differ"):
        Engine(same, tok4, cfg(tmp_path, max_steps=3)).fit(DATA[:-1], resume="latest")


@pytest.mark.parametrize("method", ["bitfit", "lora", "qlora"])
def test_sparse_checkpoints_hold_only_trainable_tensors(tmp_path, method):
    """Only the trained tensors: a frozen (even quantised) base is never copied into a checkpoint."""
    from safetensors import safe_open

    from finetune import apply_method

    model, tok = tiny_bart(d_model=64, layers=2)
    if method == "bitfit":
        bitfit(model)
    elif method == "lora":
        apply_lora(model, r=2, alpha=4)
    else:
        pytest.importorskip("bitsandbytes")
        apply_method(model, "qlora", lora_r=2, lora_alpha=4)
    Engine(model, tok, cfg(tmp_path / method, max_steps=2, save_every=2)).fit(DATA)
    full, tok = tiny_bart(d_model=64, layers=2)
    Engine(full, tok, cfg(tmp_path / "full", max_steps=2, save_every=2)).fit(DATA)
    path = tmp_path / method / "checkpoints" / "step-00000002" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    full_size = os.path.getsize(tmp_path / "full" / "checkpoints" / "step-00000002" / "model.safetensors")
    assert os.path.getsize(path) < full_size / 5


def test_checkpoint_loading_never_unpickles(tmp_path, monkeypatch):
    model, tok = fresh()
    Engine(model, tok, cfg(tmp_path, max_steps=3)).fit(DATA)

    def refuse(*a, **k):
        raise AssertionError("torch.load / pickle used while loading a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    model2, tok2 = fresh()
    Engine(model2, tok2, cfg(tmp_path, max_steps=3)).fit(DATA, resume="latest")


SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import SPELLING
    from finetune import Engine, TrainConfig
    from finetune.models import tiny_bart
    import torch
    torch.manual_seed(0)
    model, tok = tiny_bart(d_model=32)
    cfg = TrainConfig(lr=3e-3, batch_size=4, epochs=400, log_every=1, save_every={save_every}, keep_last=3,
                      progress=False, save_model=False, output_dir={out!r})
    engine = Engine(model, tok, cfg)
    engine.fit(SPELLING * 4, resume={resume!r}, on_step=lambda engine, stats: time.sleep(0.02))
    print("finished")
""")


def launch(out, save_every, resume=None):
    code = SCRIPT.format(tests=os.path.dirname(os.path.dirname(__file__)), out=str(out), save_every=save_every, resume=resume)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(out, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list_checkpoints(os.path.join(out, "checkpoints")):
            return
        time.sleep(0.1)
    raise AssertionError("no checkpoint appeared")


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = launch(tmp_path, save_every=100000)
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal" in out and "checkpoints/step-" in out
    assert "Traceback" not in err
    find_checkpoint(str(tmp_path / "checkpoints"), "latest")


def test_sigkill_partway_then_resume_from_disk(tmp_path):
    proc = launch(tmp_path, save_every=5)
    wait_for_checkpoint(tmp_path)
    time.sleep(0.3)
    proc.kill()  # SIGKILL: no handler runs, possibly mid-write
    proc.communicate(timeout=60)
    path = find_checkpoint(str(tmp_path / "checkpoints"), "latest")
    step = int(os.path.basename(path).split("-")[1])
    assert step >= 5
    state = json.loads(open(os.path.join(path, "state.json")).read())
    assert state["step"] == step
    # resuming continues from that step (the run is long; stop it with SIGTERM after it has moved on)
    written_before = len(open(tmp_path / "metrics.jsonl").readlines())
    proc = launch(tmp_path, save_every=5, resume="latest")
    deadline = time.time() + 120
    while time.time() < deadline:  # only rows the resumed process wrote (the killed one may have gone past step)
        rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl").readlines()[written_before:]]
        if rows and rows[-1]["step"] > step + 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert f"resumed from {path} at step {step}" in out, err
    after = [json.loads(x) for x in open(tmp_path / "metrics.jsonl").readlines()[written_before:]]
    assert after[0]["step"] == step + 1


@pytest.mark.parametrize("name", ["bart-full", "t5-lora"])
def test_a_checkpoint_written_before_the_sub_packages_resumes(tmp_path, name):
    """tests/fixtures/checkpoint_262dfb4: step 3 of 6, written by the flat layout (commit 262dfb4, its make.py);
    resumed here, the run ends on the weights that layout wrote at step 6 (exactly on a CPU like the one that
    wrote them, within float error elsewhere)."""
    import shutil

    from safetensors.torch import load_file

    from finetune import TrainConfig, apply_method
    from finetune.models import tiny_bart, tiny_t5

    fixture = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "checkpoint_262dfb4", name)
    out = tmp_path / name
    shutil.copytree(os.path.join(fixture, "step-00000003"), out / "checkpoints" / "step-00000003")
    model, tok = (tiny_bart if name.startswith("bart") else tiny_t5)(d_model=32)
    apply_method(model, name.split("-")[1])
    cfg = TrainConfig(lr=3e-3, batch_size=4, max_steps=6, save_every=3, seed=3, progress=False, precision="fp32",
                      optimizer="adamw", save_model=False, output_dir=str(out))
    Engine(model, tok, cfg).fit([(f"teh wrod {i}", f"the word {i}") for i in range(16)], resume="latest")
    expected = load_file(os.path.join(fixture, "final_model.safetensors"))
    got = load_file(str(out / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_resume_compares_the_optimizer_used_not_how_it_was_spelt(tmp_path):
    """A run with optimizer, betas and eps unset used the family's AdamW at (0.9, 0.98), 1e-6 (BART): naming
    them now is the same run; another optimizer is not."""
    def run(**kw):
        model, tok = tiny_bart(d_model=32)
        cfg = TrainConfig(lr=3e-3, batch_size=2, max_steps=4, save_every=2, progress=False, precision="fp32",
                          save_model=False, output_dir=str(tmp_path), **kw)
        return Engine(model, tok, cfg)

    stop = {"at": 3}  # after the checkpoint of step 2

    def interrupt(engine, stats):
        if engine.global_step == stop["at"]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(optimizer=None).fit(SPELLING, on_step=interrupt)
    stop["at"] = None
    with pytest.raises(CheckpointError, match="config.optimizer was None, is now 'adafactor'"):
        run(optimizer="adafactor").fit(SPELLING, resume="latest")
    history = run(optimizer="adamw", betas=(0.9, 0.98), eps=1e-6).fit(SPELLING, resume="latest")
    assert history["train"][-1]["step"] == 4  # resumed at step 2 and finished
