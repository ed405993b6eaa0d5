"""Parameter groups (which tensor decays, which learning rate) and schedule values."""
import pytest
import torch
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

from conftest import build
from finetune.methods import freeze
from finetune.train.optim import build_adamw, lr_factor, param_groups


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
