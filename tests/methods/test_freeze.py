"""Regex freezing, the trainable report, and BitFit on tiny BART, T5 and bert2bert."""
import pytest
import torch
from conftest import SPELLING, build

from finetune import Engine, TrainConfig, bitfit, trainable_report, unfreeze
from finetune.methods import freeze
from finetune.methods.freeze import LinearWithAddedBias
from finetune.models import tiny_bart, tiny_t5


def test_freeze_by_any_name_of_a_tied_tensor():
    model, _ = tiny_bart()
    freeze(model, [r"^lm_head\."])  # the LM head *is* the shared embedding
    assert not model.model.shared.weight.requires_grad
    assert not model.model.encoder.embed_tokens.weight.requires_grad
    unfreeze(model, [r"encoder\.embed_tokens"])
    assert model.lm_head.weight.requires_grad


def test_no_match_is_an_error_naming_the_pattern():
    model, _ = tiny_bart()
    with pytest.raises(ValueError, match=r"\['encoders\\\\.'\] match no parameter name"):
        freeze(model, [r"encoder\.", r"encoders\."])
    with pytest.raises(ValueError, match="invalid regex"):
        freeze(model, ["("])


def test_report_counts_tied_tensors_once():
    model, _ = tiny_bart()
    report = trainable_report(model)
    unique = sum(p.numel() for p in model.parameters())
    assert report.total == unique == report.trainable
    assert ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
            "lm_head.weight"] in report.shared
    assert "shared tensor (trainable): model.shared.weight = " in str(report)


def test_freezing_bart_encoder_and_decoder_leaves_nothing_and_says_why():
    model, _ = tiny_bart()
    freeze(model, [r"^model\.encoder\.", r"^model\.decoder\."])
    report = trainable_report(model)
    # the LM head is tied to the embedding that the encoder and decoder share: frozen with them
    assert report.trainable == 0
    text = str(report)
    assert "NOTHING IS TRAINABLE" in text and "shared tensor (frozen): model.shared.weight" in text


@pytest.mark.parametrize("family", ["bart", "bert2bert"])
def test_bitfit_trains_only_biases(family):
    model, _ = build(family)
    report = bitfit(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".bias") for n in names)
    assert 0 < report.percent < 20


def test_bitfit_also_for_bert2bert_new_tensors():
    model, _ = build("bert2bert")
    bitfit(model, also=[r"crossattention", r"cls\.predictions\.transform"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "decoder.bert.encoder.layer.0.crossattention.self.query.weight" in trainable
    assert "decoder.cls.predictions.transform.dense.weight" in trainable
    assert "encoder.encoder.layer.0.attention.self.query.weight" not in trainable


def test_bitfit_on_t5_refuses_without_added_biases():
    model, _ = tiny_t5()
    with pytest.raises(ValueError, match="no bias terms.*add_missing_biases=True"):
        bitfit(model)


def test_bitfit_on_t5_with_added_biases_keeps_output_at_init():
    model, tok = tiny_t5()
    batch = tok(["abc", "de"], padding=True, return_tensors="pt")
    dec = torch.zeros((2, 3), dtype=torch.long)
    with torch.no_grad():
        before = model(**batch, decoder_input_ids=dec).logits
    report = bitfit(model, add_missing_biases=True)
    with torch.no_grad():
        after = model(**batch, decoder_input_ids=dec).logits
    assert torch.equal(before, after)
    assert report.trainable > 0
    assert any(isinstance(m, LinearWithAddedBias) for m in model.modules())
    assert not isinstance(model.lm_head, LinearWithAddedBias)


@pytest.mark.parametrize("family", ["bart", "t5", "bert2bert"])
def test_bitfit_training_changes_only_biases(tmp_path, family):
    model, tok = build(family)
    bitfit(model, add_missing_biases=(family == "t5"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = Engine(model, tok, TrainConfig(lr=1e-2, progress=False, output_dir=str(tmp_path)))
    engine.overfit_batch(SPELLING, steps=3)
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            continue
        assert torch.equal(param, before[name]), f"{name} changed but is not a bias"
    changed = [n for n, p in model.named_parameters() if n.endswith(".bias") and not torch.equal(p, before[n])]
    assert changed


@pytest.mark.parametrize("name", ["full", "frozen-encoder", "bitfit", "lora", "int8-lora", "dora", "lora-plus",
                                  "rslora", "qlora"])
def test_a_second_method_is_refused_before_anything_changes(name):
    from finetune import METHODS, apply_method

    assert name in METHODS
    if "int8" in name or "qlora" in name:
        pytest.importorskip("bitsandbytes")
    model, _ = build("t5")
    settings = {"add_missing_biases": True} if name == "bitfit" else {}
    apply_method(model, name, **settings)
    before = ({n: type(m).__name__ for n, m in model.named_modules()},
              {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()})
    for second in ("lora", name):
        with pytest.raises(ValueError, match=f"has the method '{name}' applied already"):
            apply_method(model, second, **(settings if second == name else {}))
    after = ({n: type(m).__name__ for n, m in model.named_modules()},
             {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()})
    assert after[0] == before[0] and after[1].keys() == before[1].keys()
    assert all(after[1][k][0] == before[1][k][0] and torch.equal(after[1][k][1], before[1][k][1]) for k in before[1])


def test_bitfit_with_added_biases_twice_is_exactly_once_and_saves(tmp_path):
    model, tok = build("t5")
    bitfit(model, add_missing_biases=True)
    once = sum(isinstance(m, LinearWithAddedBias) for m in model.modules())
    bitfit(model, add_missing_biases=True)
    assert sum(isinstance(m, LinearWithAddedBias) for m in model.modules()) == once
    assert not any(isinstance(m.base, LinearWithAddedBias) for m in model.modules() if isinstance(m, LinearWithAddedBias))
    cfg = TrainConfig(lr=1e-3, batch_size=2, max_steps=2, progress=False, precision="fp32", output_dir=str(tmp_path))
    Engine(model, tok, cfg).fit(SPELLING)
    assert (tmp_path / "model" / "config.json").exists()
