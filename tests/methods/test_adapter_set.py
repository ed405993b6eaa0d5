"""Several adapters on one base, against PEFT doing the same on the same adapters: load under names, switch,
disable in a block, delete, merge one, weighted combinations ("linear", "cat")."""
import pytest
import torch
from conftest import build
from test_lora import logits

from finetune.methods import (active_adapter, adapter_names, add_weighted_adapter, delete_adapter, disable_adapter,
                              load_adapter, merge_adapter, set_adapter)
from finetune.methods.lora import lora_layers

peft = pytest.importorskip("peft")


def peft_adapter(path, targets, r=4, seed=0, modules_to_save=None):
    """A PEFT adapter on the tiny T5 with random A and B (and disturbed modules_to_save), written to `path`."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets,
                             modules_to_save=modules_to_save, task_type="SEQ_2_SEQ_LM")
    model = peft.get_peft_model(build("t5")[0], config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture
def two(tmp_path):
    """Two adapters (different targets and ranks; the first with a module to save), loaded by both sides."""
    one = peft_adapter(tmp_path / "one", ["q", "v"], seed=1, modules_to_save=["final_layer_norm"])
    other = peft_adapter(tmp_path / "two", ["k", "o", "v"], r=2, seed=2)
    ours, tok = build("t5")
    load_adapter(ours, one, adapter_name="one")
    load_adapter(ours, other, adapter_name="two")
    theirs = peft.PeftModel.from_pretrained(build("t5")[0], one, adapter_name="one")
    theirs.load_adapter(other, adapter_name="two")
    return ours, theirs, tok


def same(ours, theirs, tok):
    torch.testing.assert_close(logits(ours, tok), logits(theirs, tok), atol=1e-5, rtol=0)


def test_switching_between_adapters_matches_peft(two):
    ours, theirs, tok = two
    base = logits(build("t5")[0], tok)
    assert active_adapter(ours) == "one" and adapter_names(ours) == ["one", "two"]
    same(ours, theirs, tok)
    set_adapter(ours, "two")
    theirs.set_adapter("two")
    same(ours, theirs, tok)
    assert not torch.allclose(logits(ours, tok), base)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".k." in n or ".o." in n or ".v." in n for n in trainable)
    set_adapter(ours, "one")  # its module to save comes back with it
    theirs.set_adapter("one")
    same(ours, theirs, tok)
    assert ours.encoder.final_layer_norm.weight.requires_grad


def test_disable_adapter_gives_the_base_in_the_block_and_the_adapter_after(two):
    ours, theirs, tok = two
    base = logits(build("t5")[0], tok)
    adapted = logits(ours, tok)
    with disable_adapter(ours), theirs.disable_adapter():
        torch.testing.assert_close(logits(ours, tok), base, atol=0, rtol=0)
        same(ours, theirs, tok)
        assert not lora_layers(ours)
    torch.testing.assert_close(logits(ours, tok), adapted, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="inside"):
        with disable_adapter(ours):
            raise RuntimeError("inside")
    torch.testing.assert_close(logits(ours, tok), adapted, atol=0, rtol=0)


def test_delete_adapter_matches_peft(two):
    ours, theirs, tok = two
    delete_adapter(ours, "one")  # the active one: the next becomes active (PEFT wants that done first)
    theirs.set_adapter("two")
    theirs.delete_adapter("one")
    assert adapter_names(ours) == ["two"] and active_adapter(ours) == "two"
    same(ours, theirs, tok)
    with pytest.raises(ValueError, match="only adapter"):
        delete_adapter(ours, "two")
    with pytest.raises(ValueError, match="no adapter named 'one'"):
        set_adapter(ours, "one")


def test_merging_one_adapter_matches_peft(two):
    ours, theirs, tok = two
    merged = merge_adapter(ours, "two")  # the base plus "two" alone: PEFT keeps the active adapter's modules to
    theirs.set_adapter("two")  # save, so "two" is made active there first
    plain = theirs.merge_and_unload(adapter_names=["two"])
    assert not lora_layers(merged) and active_adapter(merged) is None
    torch.testing.assert_close(logits(merged, tok), logits(plain, tok), atol=1e-5, rtol=0)


@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_weighted_adapters_match_peft(tmp_path, combination):
    one = peft_adapter(tmp_path / "one", ["q", "v"], seed=1)
    other = peft_adapter(tmp_path / "two", ["q", "k"] if combination == "cat" else ["q", "v"], seed=2)
    ours, tok = build("t5")
    load_adapter(ours, one, adapter_name="one")
    load_adapter(ours, other, adapter_name="two")
    theirs = peft.PeftModel.from_pretrained(build("t5")[0], one, adapter_name="one")
    theirs.load_adapter(other, adapter_name="two")
    add_weighted_adapter(ours, ["one", "two"], [0.7, -0.4], "mix", combination)
    theirs.add_weighted_adapter(["one", "two"], [0.7, -0.4], "mix", combination_type=combination)
    set_adapter(ours, "mix")
    theirs.set_adapter("mix")
    same(ours, theirs, tok)


def test_bad_requests_are_refused_and_change_nothing(two, tmp_path):
    ours, _, tok = two
    before = logits(ours, tok)
    with pytest.raises(ValueError, match="has an adapter named 'two' already"):
        load_adapter(ours, str(tmp_path / "two"), adapter_name="two")
    ours2 = build("t5")[0]
    load_adapter(ours2, str(tmp_path / "two"), adapter_name="a")
    load_adapter(ours2, str(tmp_path / "two"), adapter_name="b")
    load_adapter(ours2, peft_adapter(tmp_path / "r4", ["q"], r=4, seed=3), adapter_name="c")
    with pytest.raises(ValueError, match="linear' needs one rank"):
        add_weighted_adapter(ours2, ["a", "c"], [1, 1], "x")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        add_weighted_adapter(ours2, ["a", "b"], [1, 1], "x", "ties")
    with pytest.raises(ValueError, match="as many weights as adapters"):
        add_weighted_adapter(ours2, ["a", "b"], [1], "x")
    with pytest.raises(ValueError, match="weights must be finite"):
        add_weighted_adapter(ours2, ["a", "b"], [1, float("nan")], "x")
    with pytest.raises(ValueError, match="modules_to_save / also_train"):
        add_weighted_adapter(ours, ["one", "two"], [1, 1], "x", "cat")
    with pytest.raises(FileNotFoundError):
        load_adapter(ours, str(tmp_path / "missing"), adapter_name="three")
    assert adapter_names(ours) == ["one", "two"] and active_adapter(ours) == "one"
    torch.testing.assert_close(logits(ours, tok), before, atol=0, rtol=0)


def test_the_cli_generates_and_evaluates_with_each_named_adapter(tmp_path, capsys):
    import json

    from finetune.cli import main

    base = tmp_path / "base"
    model, tok = build("t5")
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    one = peft_adapter(tmp_path / "one", ["q", "v"], seed=1)
    two = peft_adapter(tmp_path / "two", ["k"], seed=2)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in [("teh", "the"), ("wich", "which")]))
    named = ["--model", str(base), "--adapter", f"one={one}", "--adapter", f"two={two}", "--num-beams", "1",
             "--max-new-tokens", "4"]
    assert main(["generate", *named, "teh"]) == 0
    lines = [line.split("\t")[:2] for line in capsys.readouterr().out.splitlines() if "\t" in line]
    assert lines == [["one", "teh"], ["two", "teh"]]
    assert main(["eval", *named, "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert sorted(json.loads(out[out.index("{\n"):])) == ["one", "two"]
    assert main(["generate", "--model", str(base), "--adapter", one, "--adapter", two, "teh"]) == 2
    assert "name each one" in capsys.readouterr().err
    assert main(["generate", "--model", str(base), "--adapter", f"a={one}", "--adapter", f"a={two}", "teh"]) == 2
    assert "given twice" in capsys.readouterr().err
