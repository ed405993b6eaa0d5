"""Optimizers and their parameter groups: which tensor decays, which learning rate; schedule values; the pretraining
recipe's optimizers (AdamW, Adafactor, 8-bit AdamW), LoRA+ and rsLoRA: parity with the reference implementations,
exact resume, the family default, refusals before training."""
import shutil

import pytest
import torch
from conftest import build
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

from finetune import Engine, TrainConfig, apply_method
from finetune.methods import freeze
from finetune.methods.lora import lora_layers
from finetune.models import tiny_bart, tiny_t5
from finetune.train.checkpoint import CheckpointError
from finetune.train.optim import OPTIMIZERS, build_adamw, lr_factor, optimizer_state_bytes, param_groups


def membership(groups):
    return {name: (g["weight_decay"], g.get("lr")) for g in groups for name in g["names"]}


@pytest.mark.parametrize("family", ["bart", "t5", "bert2bert"])
def test_one_dimensional_tensors_never_decay(family):
    model, _ = build(family)
    where = membership(param_groups(model, 0.01))
    params = dict(model.named_parameters())
    assert where.keys() == params.keys()  # every trainable tensor once (tied ones under their first name)
    for name, (wd, _) in where.items():
        assert wd == (0.01 if params[name].dim() >= 2 else 0.0), name


def test_group_membership_tiny_bart():
    model, _ = build("bart")
    where = membership(param_groups(model, 0.1, no_decay=[r"embed_positions"]))
    assert where["model.shared.weight"] == (0.1, None)
    assert "lm_head.weight" not in where  # tied to model.shared.weight: one tensor, one entry
    assert where["model.encoder.layers.0.self_attn.q_proj.weight"] == (0.1, None)
    assert where["model.encoder.layers.0.self_attn.q_proj.bias"] == (0.0, None)
    assert where["model.encoder.layernorm_embedding.weight"] == (0.0, None)
    assert where["model.encoder.embed_positions.weight"] == (0.0, None)


def test_group_membership_tiny_t5():
    model, _ = build("t5")
    where = membership(param_groups(model, 0.1))
    assert where["encoder.block.0.layer.0.SelfAttention.q.weight"] == (0.1, None)
    assert where["encoder.block.0.layer.0.layer_norm.weight"] == (0.0, None)  # RMSNorm gain, 1-D
    assert where["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (0.1, None)


def test_group_membership_tiny_bert2bert_with_lr_override():
    model, _ = build("bert2bert")
    where = membership(param_groups(model, 0.01, lr_overrides={r"crossattention": 1e-3}))
    assert where["decoder.bert.encoder.layer.0.crossattention.self.query.weight"] == (0.01, 1e-3)
    assert where["decoder.bert.encoder.layer.0.crossattention.self.query.bias"] == (0.0, 1e-3)
    assert where["decoder.bert.encoder.layer.0.attention.self.query.weight"] == (0.01, None)
    assert where["encoder.embeddings.LayerNorm.weight"] == (0.0, None)


def test_frozen_tensors_are_in_no_group_and_unmatched_patterns_fail():
    model, _ = build("bart")
    freeze(model, [r"^model\.encoder\.layers"])
    where = membership(param_groups(model, 0.01))
    assert not any(n.startswith("model.encoder.layers") for n in where)
    with pytest.raises(ValueError, match=r"\['nothing_here'\] match no trainable parameter"):
        param_groups(model, 0.01, no_decay=["nothing_here"])
    with pytest.raises(ValueError, match=r"\['model\\\\.encoder\\\\.layers'\] match no trainable"):
        param_groups(model, 0.01, lr_overrides={r"model\.encoder\.layers": 1.0})


def test_family_betas():
    bart, _ = build("bart")
    t5, _ = build("t5")
    b2b, _ = build("bert2bert")
    assert build_adamw(bart, param_groups(bart, 0.0), 1e-4).defaults["betas"] == (0.9, 0.98)
    assert build_adamw(t5, param_groups(t5, 0.0), 1e-4).defaults["eps"] == 1e-8
    opt = build_adamw(b2b, param_groups(b2b, 0.0), 1e-4, betas=(0.8, 0.9), eps=1e-7)
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-7


@pytest.mark.parametrize("schedule,reference", [
    ("linear", lambda o, w, t: get_linear_schedule_with_warmup(o, w, t)),
    ("cosine", lambda o, w, t: get_cosine_schedule_with_warmup(o, w, t)),
    ("constant", lambda o, w, t: get_constant_schedule_with_warmup(o, w)),
])
def test_schedules_match_transformers(schedule, reference):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = reference(opt, 10, 100)
    for step in range(101):
        assert lr_factor(step, 100, 10, schedule) == pytest.approx(ref.lr_lambdas[0](step), abs=1e-12), step


def test_schedule_landmarks():
    assert lr_factor(0, 100, 10) == 0.0  # start of warm-up
    assert lr_factor(10, 100, 10) == 1.0  # end of warm-up: the peak
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)  # middle of the decay
    assert lr_factor(100, 100, 10) == 0.0  # the end
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(0, 100, 0) == 1.0  # no warm-up: full rate at once
    assert lr_factor(70, 100, 10, "constant") == 1.0


DATA = [(f"teh wrod {i}", f"the word {i}") for i in range(16)]


def cfg(out, **kw):
    base = dict(lr=3e-3, batch_size=4, max_steps=4, progress=False, output_dir=str(out), precision="fp32",
                schedule="constant", weight_decay=0.0, max_grad_norm=None, fused_loss=False)
    return TrainConfig(**{**base, **kw})


def reference_optimizer(name, params, lr, model):
    """The implementation each name stands for, built by hand as its own documentation says."""
    from finetune.train.optim import family_adam

    betas, eps = family_adam(model)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    if name == "adafactor":  # the T5 fine-tuning settings (transformers' Adafactor documentation)
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         clip_threshold=1.0)
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_makes_the_reference_implementations_updates(tmp_path, name):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    model, tok = tiny_bart()
    reference = tiny_bart()[0]
    reference.load_state_dict(model.state_dict())
    engine = Engine(model, tok, cfg(tmp_path, optimizer=name))
    run = engine.prepare(DATA)
    windows = [window for _, window in engine.windows(run, 0)]
    optimizer = reference_optimizer(name, [p for p in reference.parameters() if p.requires_grad], 3e-3, reference)
    for window in windows:
        (batch,) = window
        engine.train_step(window)
        loss = reference(**batch).loss  # transformers' own loss: mean over the target tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for (n, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0, msg=n)
    moved = sum(float((a - b).abs().sum()) for a, b in zip(model.parameters(), tiny_bart()[0].parameters()))
    assert moved > 0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_is_bit_exact_with_each_optimizer(tmp_path, name):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    whole = tmp_path / "whole"
    model, tok = tiny_bart()
    Engine(model, tok, cfg(whole, optimizer=name, save_every=2, keep_last=5, max_steps=6)).fit(DATA)
    again = tmp_path / "again"
    shutil.copytree(whole, again)
    shutil.rmtree(again / "model")
    resumed, tok = tiny_bart()
    Engine(resumed, tok, cfg(again, optimizer=name, save_every=2, keep_last=5, max_steps=6)).fit(
        DATA, resume=str(again / "checkpoints" / "step-00000002"))
    for (n, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_resuming_with_another_optimizer_is_refused(tmp_path):
    model, tok = tiny_bart()
    Engine(model, tok, cfg(tmp_path, optimizer="adafactor", save_every=2)).fit(DATA)
    engine = Engine(*tiny_bart(), cfg(tmp_path, optimizer="adamw", save_every=2))
    with pytest.raises(CheckpointError, match="config.optimizer was 'adafactor', is now 'adamw'"):
        engine.prepare(DATA, resume="latest")


def test_t5_defaults_to_adafactor_and_says_so_and_adamw_overrides_it(tmp_path, capsys):
    from transformers.optimization import Adafactor

    engine = Engine(*tiny_t5(), cfg(tmp_path, progress=True, lr=None, schedule=None))
    engine.prepare(DATA)
    out = capsys.readouterr().out
    assert isinstance(engine.optimizer, Adafactor) and "optimizer adafactor, lr 1e-3 constant (the family recipe)" \
        in out
    assert engine.optimizer.param_groups[0]["lr"] == 1e-3 and engine.scheduler.lr_lambdas[0](3) == 1.0
    engine = Engine(*tiny_t5(), cfg(tmp_path, optimizer="adamw", lr=None, schedule=None, progress=True))
    engine.prepare(DATA)  # the lr and schedule follow the optimizer in use: AdamW's
    assert isinstance(engine.optimizer, torch.optim.AdamW) and engine.optimizer.param_groups[0]["lr"] == 5e-5
    assert "optimizer adamw, lr 5e-5 linear (lr and schedule from the family recipe)" in capsys.readouterr().out
    bart = Engine(*tiny_bart(), cfg(tmp_path, lr=None, schedule=None))
    bart.prepare(DATA)
    assert isinstance(bart.optimizer, torch.optim.AdamW) and bart.optimizer.param_groups[0]["lr"] == 5e-5
    assert bart.scheduler.lr_lambdas[0](3) < 1.0  # linear decay


def test_a_set_lr_or_schedule_wins_over_the_family_recipe(tmp_path, capsys):
    engine = Engine(*tiny_t5(), cfg(tmp_path, lr=3e-4, schedule=None, progress=True))
    engine.prepare(DATA)
    assert engine.optimizer.param_groups[0]["lr"] == 3e-4 and engine.scheduler.lr_lambdas[0](3) == 1.0
    assert "optimizer adafactor, lr 3e-4 constant (optimizer and schedule from the family recipe)" in \
        capsys.readouterr().out
    engine = Engine(*tiny_t5(), cfg(tmp_path, lr=None, schedule="linear", warmup_steps=2))
    engine.prepare(DATA)
    assert engine.optimizer.param_groups[0]["initial_lr"] == 1e-3 and engine.scheduler.lr_lambdas[0](1) == 0.5


def test_a_resume_compares_the_lr_and_schedule_used_not_how_they_were_spelt(tmp_path):
    Engine(*tiny_t5(), cfg(tmp_path, lr=None, schedule=None, save_every=2)).fit(DATA)
    same = Engine(*tiny_t5(), cfg(tmp_path, lr=1e-3, schedule="constant", save_every=2, max_steps=6))
    with pytest.raises(CheckpointError, match="config.max_steps was 4, is now 6"):  # only that differs
        same.prepare(DATA, resume="latest")
    Engine(*tiny_t5(), cfg(tmp_path, lr=1e-3, schedule="constant", save_every=2)).prepare(DATA, resume="latest")
    other = Engine(*tiny_t5(), cfg(tmp_path, lr=5e-5, schedule=None, save_every=2))
    with pytest.raises(CheckpointError, match="config.lr was None, is now 5e-05"):
        other.prepare(DATA, resume="latest")


def test_a_bad_optimizer_name_is_refused_before_training():
    with pytest.raises(ValueError, match=r"TrainConfig.optimizer='sgd': must be one of 'adamw', 'adafactor'"):
        TrainConfig(optimizer="sgd")


def test_state_bytes_per_trainable_parameter(tmp_path):
    per_param = {}
    for name in OPTIMIZERS:
        if name == "adamw8bit" and not _has_bitsandbytes():
            continue
        model, tok = tiny_bart(d_model=256)
        engine = Engine(model, tok, cfg(tmp_path / name, optimizer=name, max_steps=1))
        history = engine.fit(DATA)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        per_param[name] = optimizer_state_bytes(engine.optimizer) / trainable
        assert history["train"][0]["optimizer_state_bytes"] == optimizer_state_bytes(engine.optimizer)
    assert per_param["adamw"] == pytest.approx(8, abs=0.01)
    assert per_param["adafactor"] < 0.2
    if "adamw8bit" in per_param:
        assert per_param["adamw8bit"] < 2.5


def _has_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def test_lora_plus_trains_b_at_a_multiple_of_as_rate():
    model, _ = tiny_bart()
    apply_method(model, "lora-plus")  # ratio 16 by default
    groups = param_groups(model, 0.0, lr=1e-4)
    rate = {name: g.get("lr", 1e-4) for g in groups for name in g["names"]}
    assert all(rate[n] == pytest.approx(1.6e-3) for n in rate if ".lora_B." in n)
    assert all(rate[n] == 1e-4 for n in rate if ".lora_A." in n)
    plain, _ = tiny_bart()
    apply_method(plain, "lora", lora_plus_ratio=4.0)
    assert sorted(g.get("lr", 1e-4) for g in param_groups(plain, 0.0, lr=1e-4)) == pytest.approx([1e-4, 4e-4])


def test_rslora_scales_by_alpha_over_sqrt_r_and_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    from finetune import load_adapter, save_adapter

    model, tok = tiny_bart()
    apply_method(model, "rslora", lora_r=4, lora_alpha=8.0)
    assert all(layer.scaling == pytest.approx(8 / 2) for layer in lora_layers(model).values())
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    batch = tok(["teh cat"], return_tensors="pt")
    labels = tok(text_target=["the cat"], return_tensors="pt")["input_ids"]
    model.eval()
    ours = model(**batch, labels=labels).logits
    save_adapter(model, str(tmp_path / "peft"), format="peft")
    peft_model = PeftModel.from_pretrained(tiny_bart()[0], str(tmp_path / "peft"))
    assert peft_model.peft_config["default"].use_rslora
    peft_model.eval()
    torch.testing.assert_close(peft_model(**batch, labels=labels).logits, ours, atol=1e-5, rtol=0)
    back, _ = tiny_bart()
    load_adapter(back, str(tmp_path / "peft"))
    back.eval()
    torch.testing.assert_close(back(**batch, labels=labels).logits, ours, atol=1e-5, rtol=0)


def test_run_files_and_set_reach_the_optimizer_and_lora_settings(tmp_path):
    from finetune.run_config import load_run_config

    run = tmp_path / "run.toml"
    run.write_text('[model]\nname = "tiny-t5"\n[method]\nname = "lora"\nlora_rslora = true\n[train]\n'
                   'optimizer = "adamw8bit"\n')
    config = load_run_config(str(run), ["method.lora_plus_ratio=8", "train.optimizer=\"adafactor\""])
    assert config.method.settings == {"lora_rslora": True, "lora_plus_ratio": 8.0}
    assert config.train.optimizer == "adafactor"
    with pytest.raises(ValueError, match=r"\[method\] lora_plus_ratio = -1(\.0)?: must be > 0"):
        load_run_config(str(run), ["method.lora_plus_ratio=-1"])


def test_adafactor_at_an_adamw_sized_rate_is_said(tmp_path):
    engine = Engine(*tiny_t5(), cfg(tmp_path, lr=5e-5))  # TrainConfig's default rate, made for AdamW
    with pytest.warns(UserWarning, match=r"Adafactor at lr 5e-05.*constant 1e-3.*optimizer='adamw'"):
        engine.prepare(DATA)


def test_chunked_8bit_update_equals_bitsandbytes_whole_tensor_update():
    bnb = pytest.importorskip("bitsandbytes")
    from finetune.train.optim import CHUNK, chunked_adamw8bit

    torch.manual_seed(0)
    start = torch.randn(CHUNK * 2 + 1000)  # over two chunks, the last one partial
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    chunked = chunked_adamw8bit()([ours], lr=1e-2, weight_decay=0.01)
    whole = bnb.optim.AdamW8bit([theirs], lr=1e-2, weight_decay=0.01)
    for step in range(3):
        grad = torch.randn_like(start)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        chunked.step()
        whole.step()
    assert torch.equal(ours, theirs) and not torch.equal(ours, start)
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(chunked.state[ours][key], whole.state[theirs][key]), key
