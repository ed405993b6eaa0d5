"""The CUDA paths: fp16 with the loss scaler, bf16, bitsandbytes int8 + LoRA, and `auto` on a GPU.

Skipped without a CUDA device (CI has none); `benchmarks/gpu_check.sh` runs them where one is available.
"""
import pytest
import torch
from conftest import SPELLING

from finetune import Engine, TrainConfig, apply_method
from finetune.models import tiny_bart, tiny_t5

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def cfg(tmp_path, **kw):
    return TrainConfig(**{"lr": 3e-3, "batch_size": 6, "progress": False, "save_model": False,
                          "output_dir": str(tmp_path), "device": "cuda", **kw})


def test_fp16_trains_with_an_enabled_loss_scaler(tmp_path):
    model, tok = tiny_bart(d_model=64, layers=2)
    engine = Engine(model, tok, cfg(tmp_path, precision="fp16"))
    assert engine.precision.scaler.is_enabled()
    history = engine.overfit_batch(SPELLING, steps=150)
    assert history[-1]["loss"] < history[0]["loss"] * 0.3
    assert engine.precision.scaler.get_scale() > 0


def test_fp16_with_t5_warns(tmp_path):
    model, tok = tiny_t5()
    with pytest.warns(UserWarning, match="overflow"):
        Engine(model, tok, cfg(tmp_path, precision="fp16"))


@pytest.mark.real_auto_precision
def test_auto_picks_bf16_on_a_gpu_that_has_it(tmp_path):
    model, tok = tiny_bart()
    engine = Engine(model, tok, cfg(tmp_path, precision="auto"))
    assert engine.precision.name == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert not engine.precision.scaler.is_enabled()


def test_bf16_trains(tmp_path):
    model, tok = tiny_bart(d_model=64, layers=2)
    history = Engine(model, tok, cfg(tmp_path, precision="bf16")).overfit_batch(SPELLING, steps=150)
    assert history[-1]["loss"] < history[0]["loss"] * 0.3


def test_int8_lora_trains_on_cuda(tmp_path):
    pytest.importorskip("bitsandbytes")
    model, tok = tiny_bart(d_model=64, layers=2)
    apply_method(model, "int8-lora", lora_r=8, lora_alpha=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = Engine(model, tok, cfg(tmp_path, lr=1e-2)).overfit_batch(SPELLING, steps=60)
    assert history[-1]["loss"] < history[0]["loss"] * 0.8
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.cpu(), before[n].cpu())}
    assert changed and all(".lora_" in n for n in changed)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_qlora_trains_on_cuda_in_half_precision(tmp_path, precision):
    """QLoRA with a half-precision compute dtype: the public reports of NaN / a loss stuck at 0 on flan-t5 with fp16
    are T5's overflow (the engine warns) - on BART the loss must fall and stay finite."""
    pytest.importorskip("bitsandbytes")
    from finetune.methods.int4 import Int4Linear

    model, tok = tiny_bart(d_model=64, layers=2)
    apply_method(model, "qlora", lora_r=8, lora_alpha=16)
    engine = Engine(model, tok, cfg(tmp_path, lr=1e-2, precision=precision))
    assert all(m.compute_dtype == engine.precision.dtype for m in model.modules() if isinstance(m, Int4Linear))
    history = engine.overfit_batch(SPELLING, steps=60)
    losses = [h["loss"] for h in history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] * 0.8, losses


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_nccl_two_ranks_equal_one_process(tmp_path):
    import test_distributed

    test_distributed.test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, "full")
