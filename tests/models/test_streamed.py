"""Quantising while loading (finetune.models.streamed): the same codes, adapters and outputs as loading and then
quantising, a peak memory below the float model's, and a clear error for every checkpoint it cannot read."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BUILDERS

from finetune import apply_method
from finetune.methods.registry import QUANTIZED_AT_LOAD
from finetune.models import ModelNotAvailable, load_quantized, load_seq2seq

pytest.importorskip("bitsandbytes")


def _sharded(tmp_path, family, dtype=torch.float32, shard="30KB", d_model=64):
    model, tokenizer = BUILDERS[family](d_model=d_model) if family != "bert2bert" else BUILDERS[family](hidden=d_model)
    folder = tmp_path / f"{family}-{str(dtype)[6:]}"
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _loaded_both_ways(folder, method, **settings):
    plain, _ = load_seq2seq(folder)
    torch.manual_seed(0)
    apply_method(plain, method, **settings)
    streamed, _ = load_quantized(folder, method, **settings)
    torch.manual_seed(0)
    apply_method(streamed, method, **settings)
    return plain, streamed


@pytest.mark.parametrize("method", ["qlora", "int8-lora"])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_quantised_while_loading_equals_load_then_quantise(tmp_path, family, method):
    folder = _sharded(tmp_path, family)
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 3  # really sharded
    plain, streamed = _loaded_both_ways(folder, method)
    a, b = plain.state_dict(), streamed.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    ids, labels = torch.tensor([[5, 6, 7, 8, 2]]), torch.tensor([[5, 6, 2]])
    plain.eval(), streamed.eval()
    assert torch.equal(plain(input_ids=ids, labels=labels).logits, streamed(input_ids=ids, labels=labels).logits)


def test_bf16_checkpoint_and_quantized_kept_layers(tmp_path):
    """A bf16 checkpoint keeps its dtype outside the quantised layers; `quantize_kept` quantises T5's `wo` too
    (its 4-bit weight reads as int8, so T5 does not cast the activations entering it to integers)."""
    folder = _sharded(tmp_path, "t5", torch.bfloat16)
    plain, streamed = _loaded_both_ways(folder, "qlora", quantize_kept=True)
    wo = streamed.encoder.block[0].layer[1].DenseReluDense.wo
    assert getattr(type(wo), "is_quantized_linear", False) and wo.weight.dtype == torch.int8
    assert streamed.shared.weight.dtype == torch.bfloat16
    for key, value in plain.state_dict().items():
        assert torch.equal(value, streamed.state_dict()[key]), key
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = streamed(input_ids=torch.tensor([[5, 6, 7, 2]]), labels=torch.tensor([[5, 2]]))
    assert torch.isfinite(out.loss)


def test_the_method_applied_must_match_what_was_quantised(tmp_path):
    folder = _sharded(tmp_path, "bart")
    model, _ = load_quantized(folder, "qlora", quant_type="fp4")
    assert getattr(model, QUANTIZED_AT_LOAD)["settings"]["quant_type"] == "fp4"
    with pytest.raises(ValueError, match="quantised while it loaded"):
        apply_method(model, "qlora")  # nf4 asked, fp4 loaded
    with pytest.raises(ValueError, match="quantised while it loaded"):
        apply_method(load_quantized(folder, "qlora")[0], "int8-lora")
    apply_method(model, "qlora", quant_type="fp4", lora_r=4)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_bad_folders_and_methods_are_named(tmp_path):
    folder = _sharded(tmp_path, "t5")
    with pytest.raises(ValueError, match="does not quantise its base"):
        load_quantized(folder, "lora")
    with pytest.raises(ValueError, match="quant_type"):
        load_quantized(folder, "qlora", quant_type="nf5")
    with pytest.raises(ModelNotAvailable, match="not a local model folder"):
        load_quantized(str(tmp_path / "nowhere"), "qlora")
    index = os.path.join(folder, "model.safetensors.index.json")
    weight_map = json.load(open(index))["weight_map"]
    lost = sorted(set(weight_map.values()))[1]
    os.rename(os.path.join(folder, lost), os.path.join(folder, lost + ".moved"))
    with pytest.raises(ModelNotAvailable, match="names shards that are not in the folder"):
        load_quantized(folder, "qlora")
    os.rename(os.path.join(folder, lost + ".moved"), os.path.join(folder, lost))
    kept = {k: v for k, v in weight_map.items() if v != lost}
    json.dump({"metadata": {}, "weight_map": kept}, open(index, "w"))
    with pytest.raises(ModelNotAvailable, match="lacks"):
        load_quantized(folder, "qlora")


MEASURE = textwrap.dedent("""
    import json, sys
    from finetune import apply_method
    from finetune.models import load_quantized, load_seq2seq

    def rss(field):
        return int([l for l in open("/proc/self/status") if l.startswith(field)][0].split()[1]) * 1024

    def load(folder):
        if sys.argv[3] == "streamed":
            return load_quantized(folder, "qlora")[0]
        model = load_seq2seq(folder)[0]
        return apply_method(model, "qlora")

    load(sys.argv[2])  # the small model: every import and first-call cost paid before the measure
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current RSS
    before = rss("VmRSS:")
    model = load(sys.argv[1])
    print(json.dumps({"peak": rss("VmHWM:") - before}))
""")


def test_peak_memory_stays_below_the_float_model(tmp_path):
    """In a fresh process: quantising while loading a sharded fp32 T5 of ~176 MB (24 + 24 layers, shards of 20 MB)
    adds at most 0.65 of its size at the peak (the 4-bit layers, one shard, one layer's work buffers, ~40 MB of
    first calls); loading then quantising adds about its whole size (the float model is mapped from its files,
    every page read once to quantise it)."""
    small = _sharded(tmp_path, "t5")
    model, tokenizer = BUILDERS["t5"](d_model=256, layers=24)
    model.config.d_ff = 1024
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration(model.config)
    folder = tmp_path / "t5-176mb"
    model.save_pretrained(folder, max_shard_size="20MB")
    tokenizer.save_pretrained(folder)
    size = sum(p.numel() * 4 for p in model.parameters())
    del model
    peaks = {}
    for way in ("streamed", "loaded"):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), small, way], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[way] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    assert peaks["streamed"] < 0.65 * size < 0.8 * size < peaks["loaded"], (peaks, size)


def test_a_quantised_model_is_saved_shard_by_shard_and_reloads(tmp_path):
    """model/ of a quantised base: written shard by shard in the checkpoint's dtype (bf16 here), the dequantised
    base with the adapters merged; it reloads plainly and quantised-while-loading, with the same outputs."""
    from finetune.store.export import save_plain

    folder = _sharded(tmp_path, "bart", torch.bfloat16)
    model, tokenizer = load_quantized(folder, "int8-lora")
    apply_method(model, "int8-lora", lora_r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # a trained adapter: the merge must show in the saved weights
    out = tmp_path / "saved"
    save_plain(model, tokenizer, str(out), extra=None)
    import finetune.store.export as export

    export.save_sharded(model, str(tmp_path / "small-shards"), shard_bytes=20_000)
    shards = [f for f in os.listdir(tmp_path / "small-shards") if f.endswith(".safetensors")]
    assert len(shards) > 3 and (tmp_path / "small-shards" / "model.safetensors.index.json").exists()
    for f in (out, tmp_path / "small-shards"):
        tokenizer.save_pretrained(f)
    ids = torch.tensor([[5, 6, 7, 8, 2]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = model(input_ids=ids, decoder_input_ids=ids).logits.float()
    for path in (out, tmp_path / "small-shards"):
        reloaded, _ = load_seq2seq(str(path))
        assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
        assert not [k for k in reloaded.state_dict() if "lora_" in k or ".inner." in k]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = reloaded(input_ids=ids, decoder_input_ids=ids).logits.float()
        assert float((got - trained).norm() / trained.norm()) < 2e-2  # bf16 weights, int8 activations
    requantised, _ = load_quantized(str(out), "int8-lora")
    assert getattr(requantised, QUANTIZED_AT_LOAD)["quantizer"] == "quantize_int8"


def test_a_run_file_quantises_a_model_folder_while_it_loads(tmp_path, capsys):
    """`finetune train` on a model folder with qlora quantises it while loading (once); `finetune generate` and
    `eval` take the base quantised again plus the run's adapter, and compute what the saved model/ computes."""
    from finetune.cli import main

    folder = _sharded(tmp_path, "bart")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n"
                            for s, t in [("teh", "the"), ("adress", "address"), ("wich", "which")]))
    run = tmp_path / "run.toml"
    run.write_text(textwrap.dedent(f"""
        [model]
        name = "{folder}"
        [method]
        name = "qlora"
        lora_r = 4
        [data]
        train = "{data}"
        [train]
        max_steps = 3
        batch_size = 3
        lr = 0.05
        output_dir = "{tmp_path / 'out'}"
        progress = false
        precision = "fp32"
    """))
    assert main(["train", str(run)]) == 0
    log = capsys.readouterr().out
    assert "quantize_4bit (nf4) while loading" in log and "quantize_4bit (nf4): " not in log  # quantised once, while loading
    merged, tokenizer = load_seq2seq(str(tmp_path / "out" / "model"))
    assert not [k for k in merged.state_dict() if "lora_" in k]
    from finetune import load_adapter

    base, _ = load_quantized(folder, "qlora")
    load_adapter(base, str(tmp_path / "out" / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8, 2]])
    want = merged.eval()(input_ids=ids, decoder_input_ids=ids).logits
    got = base.eval()(input_ids=ids, decoder_input_ids=ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-4
    adapter = ["--model", folder, "--adapter", str(tmp_path / "out" / "adapter"), "--quantize", "qlora",
               "--num-beams", "1"]
    assert main(["generate", *adapter, "teh", "wich"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in printed if "\t" in line] == ["teh", "wich"]
    assert main(["eval", *adapter, "--data", str(data), "--output-dir", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert 0 <= json.loads(out[out.index("{\n"):])["exact_match"] <= 1
    assert main(["generate", "--model", folder, "--adapter", str(tmp_path / "nowhere"), "teh"]) == 2
    assert "--adapter" in capsys.readouterr().err


def test_a_t5_lm_head_of_its_own_stays_its_own(tmp_path):
    """transformers 5 declares T5's LM head tied to the embedding; a checkpoint holding both with different values
    (every Flan-T5) loads them apart, in both loaders."""
    from safetensors.torch import load_file, save_file

    folder = _sharded(tmp_path, "t5", shard="10MB")
    weights = load_file(os.path.join(folder, "model.safetensors"))
    assert "lm_head.weight" not in weights
    weights["lm_head.weight"] = weights["shared.weight"] * 2 + 1
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    plain, streamed = _loaded_both_ways(folder, "qlora")
    for model in (plain, streamed):
        assert model.lm_head.weight is not model.shared.weight
        assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])
        assert model.encoder.embed_tokens.weight is model.shared.weight
