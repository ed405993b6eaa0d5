"""modules_to_save: modules trained in full beside LoRA and saved with it, in PEFT's format both ways (PEFT 0.21's
keys and matching rule), including a warm-started bert2bert's new tensors (the main job's LoRA run)."""
import pytest
import torch
from conftest import build
from test_lora import logits, randomise_b

from finetune.methods import apply_method
from finetune.methods.adapters import load_adapter, save_adapter
from finetune.methods.lora import apply_lora, full_tensors, lora_layers

peft = pytest.importorskip("peft")


def bert2bert_with_new_tensors(seed=0):
    """A tiny bert2bert whose cross-attention and LM-head transform play the warm start's new tensors."""
    torch.manual_seed(seed)
    model, tok = build("bert2bert")
    new = [n for n, _ in model.named_parameters() if "crossattention" in n or "cls.predictions" in n
           and "decoder.weight" not in n]
    return model, tok, new


def disturb(tensors, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.add_(torch.randn(t.shape, generator=g) * 0.05)


def test_the_main_jobs_lora_run_exports_to_peft_with_the_same_logits(tmp_path):
    model, tok, new = bert2bert_with_new_tensors()
    apply_method(model, "lora", new, lora_r=4)
    randomise_b(model)
    disturb(full_tensors(model).values())  # the new tensors as training leaves them
    save_adapter(model, str(tmp_path), format="peft")
    import json

    config = json.load(open(tmp_path / "adapter_config.json"))
    assert any(m.endswith("crossattention") for m in config["modules_to_save"])
    fresh, _, _ = bert2bert_with_new_tensors(seed=1)  # other random new tensors: the adapter must carry them
    theirs = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    torch.testing.assert_close(logits(theirs, tok), logits(model, tok), atol=1e-5, rtol=0)
    again, _, _ = bert2bert_with_new_tensors(seed=2)
    load_adapter(again, str(tmp_path))  # and back into the engine
    torch.testing.assert_close(logits(again, tok), logits(model, tok), atol=1e-5, rtol=0)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_a_peft_adapter_with_modules_to_save_loads_into_the_engine(tmp_path):
    model, tok = build("t5")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "v"],
                             modules_to_save=["layer_norm"], task_type="SEQ_2_SEQ_LM")
    theirs = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(str(tmp_path))
    ours, _ = build("t5")
    load_adapter(ours, str(tmp_path))
    torch.testing.assert_close(logits(ours, tok), logits(theirs, tok), atol=1e-5, rtol=0)
    trained = {n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained and all(n.endswith("layer_norm.weight") for n in trained)  # final_layer_norm too, as PEFT


def test_modules_to_save_as_a_method_setting_round_trips_through_peft(tmp_path):
    model, tok = build("t5")
    apply_method(model, "lora", lora_r=4, modules_to_save=["final_layer_norm"])
    saved = full_tensors(model)
    assert sorted(saved) == ["decoder.final_layer_norm.weight", "encoder.final_layer_norm.weight"]
    assert all(p.requires_grad for p in saved.values())
    randomise_b(model)
    disturb(saved.values())
    save_adapter(model, str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(build("t5")[0], str(tmp_path))
    torch.testing.assert_close(logits(theirs, tok), logits(model, tok), atol=1e-5, rtol=0)


def test_a_tied_tensor_in_a_module_to_save_stays_frozen_and_unsaved(tmp_path):
    model, tok = build("bart")  # lm_head.weight is the shared embedding
    apply_lora(model, r=4, modules_to_save=["lm_head"])
    assert not model.lm_head.weight.requires_grad and "lm_head.weight" not in full_tensors(model)


@pytest.mark.parametrize("entries, message", [
    (["no_such_module"], r"\['no_such_module'\] name no module with parameters"),
    (["SelfAttention"], "holds the LoRA target"),
    (["layer.0", "layer.0.layer_norm"], "lies inside"),
    ([3], "expected a list of module names"),
])
def test_bad_modules_to_save_are_refused_before_anything_changes(entries, message):
    model, tok = build("t5")
    before = logits(model, tok)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, r=4, modules_to_save=entries)
    assert not lora_layers(model) and torch.equal(logits(model, tok), before)
    assert all(p.requires_grad for p in model.parameters())


def test_an_adapter_tensor_outside_its_modules_to_save_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok = build("t5")
    apply_lora(model, r=4, modules_to_save=["final_layer_norm"])
    save_adapter(model, str(tmp_path), format="peft")
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    state["base_model.model.encoder.block.0.layer.0.layer_norm.weight"] = torch.ones(
        model.config.d_model)
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    fresh, _ = build("t5")
    with pytest.raises(ValueError, match="neither LoRA's nor in one of the adapter's modules_to_save"):
        load_adapter(fresh, str(tmp_path))
    assert not lora_layers(fresh)


def test_modules_to_save_from_a_run_file_and_set(tmp_path):
    import json

    from test_cli import write_run

    from finetune.cli import main

    config, _, out = write_run(tmp_path, method="lora")
    assert main(["train", str(config), "--set", "train.epochs=2", "--set",
                 'method.modules_to_save=["self_attn_layer_norm"]']) == 0
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] and all(m.endswith("self_attn_layer_norm") for m in saved["modules_to_save"])
    assert main(["train", str(config), "--set", "method.modules_to_save=[3]", "--set", "train.epochs=1"]) == 2
