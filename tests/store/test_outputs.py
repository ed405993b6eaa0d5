"""Never silently wrong: a saved model reloads as trained, one run owns its output folder, bad inputs are refused
before the first step, and nothing is lost (issue "Never silently wrong"; one test per finding, numbered)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from finetune import DataError, Engine, TrainConfig, TrainingStopped, apply_lora, read_pairs
from finetune.methods import apply_method
from finetune.methods.adapters import load_adapter, save_adapter
from finetune.methods.lora import lora_layers
from finetune.models import ModelNotAvailable, load_seq2seq, tiny_bart, tiny_bert2bert, tiny_t5
from finetune.store.outputs import OutputDirError
from finetune.train.checkpoint import CheckpointError, find_checkpoint, list_checkpoints

DATA = [(f"teh wrod {i}", f"the word {i}") for i in range(24)]


def cfg(out, **kw):
    base = dict(lr=1e-2, batch_size=8, max_steps=3, progress=False, output_dir=str(out))
    return TrainConfig(**{**base, **kw})


def logits(model, tokenizer):
    model.eval()
    enc = tokenizer(["teh wrod 3", "abc"], return_tensors="pt", padding=True)
    decoder = torch.full((2, 5), model.config.decoder_start_token_id)
    with torch.no_grad():
        return model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, decoder_input_ids=decoder).logits


# --- 1. model/ reloads as the trained model, after every method ---------------------------------------------

METHOD_CASES = [
    ("bart", "full", {}), ("bart", "frozen-encoder", {}), ("bart", "bitfit", {}), ("bart", "lora", {}),
    ("bart", "int8-lora", {}), ("t5", "bitfit", {"add_missing_biases": True}), ("t5", "lora", {}),
    ("bert2bert", "lora", {}), ("bert2bert", "full", {}),
]
BUILD = {"bart": tiny_bart, "t5": tiny_t5, "bert2bert": tiny_bert2bert}


@pytest.mark.parametrize("family,method,kw", METHOD_CASES, ids=[f"{f}-{m}" for f, m, _ in METHOD_CASES])
def test_saved_model_reloads_with_the_trained_logits(tmp_path, family, method, kw):
    model, tok = BUILD[family]()
    apply_method(model, method, **kw)
    Engine(model, tok, cfg(tmp_path)).fit(DATA)
    trained = logits(model, tok)
    reloaded, _ = load_seq2seq(str(tmp_path / "model"))
    got = logits(reloaded, tok)
    # int8: the reloaded model holds the dequantised weights, without int8's rounding of the activations
    tolerance = 2e-3 if method == "int8-lora" else 1e-5
    assert float((got - trained).norm() / trained.norm()) < tolerance
    if method in ("lora", "int8-lora"):  # model/ is plain: no adapter keys; the adapter is saved beside it
        from safetensors import safe_open

        with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if "lora_" in k or "base_layer" in k or ".inner." in k]
        assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_save_merged_false_keeps_the_adapter_alone(tmp_path, capsys):
    """save_merged=False: a LoRA run writes adapter/ (naming its base) and no model/; a run without an adapter
    writes model/ anyway and says why (its training is never lost)."""
    model, tok = tiny_bart()
    apply_lora(model, r=4, dropout=0.0)
    Engine(model, tok, cfg(tmp_path / "lora", save_merged=False)).fit(DATA)
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "lora" / "model").exists()
    fresh, _ = tiny_bart()
    load_adapter(fresh, str(tmp_path / "lora" / "adapter"))
    assert torch.allclose(logits(fresh, tok), logits(model, tok), atol=1e-5)
    full, tok = tiny_bart()
    Engine(full, tok, cfg(tmp_path / "full", save_merged=False, progress=True)).fit(DATA)
    assert (tmp_path / "full" / "model" / "model.safetensors").exists()
    assert "no adapter to save alone" in capsys.readouterr().out


def test_lora_model_folder_is_a_plain_transformers_checkpoint(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model, tok = tiny_bart()
    apply_lora(model, r=4, dropout=0.0)
    Engine(model, tok, cfg(tmp_path)).fit(DATA)
    plain, info = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "model"), output_loading_info=True)
    assert not any(info.values())
    assert torch.allclose(logits(plain, tok), logits(model, tok), atol=1e-5)
    fresh, tok = tiny_bart()  # the PEFT-format adapter beside it gives the same model on the base
    load_adapter(fresh, str(tmp_path / "adapter"))


def test_damaged_saved_model_is_an_error_not_a_random_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok = tiny_bart()
    Engine(model, tok, cfg(tmp_path)).fit(DATA)
    weights = tmp_path / "model" / "model.safetensors"
    state = load_file(str(weights))
    del state[next(k for k in state if "q_proj.weight" in k)]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelNotAvailable, match="missing"):
        load_seq2seq(str(tmp_path / "model"))


# --- 2. a fresh run into a folder with another run's checkpoints ------------------------------------------

def test_fresh_run_over_old_checkpoints_is_refused_and_nothing_deleted(tmp_path):
    model, tok = tiny_bart()
    Engine(model, tok, cfg(tmp_path, max_steps=6, save_every=2, keep_last=5)).fit(DATA)
    before = list_checkpoints(tmp_path / "checkpoints")
    model, tok = tiny_bart()
    with pytest.raises(OutputDirError, match="already holds the outputs of another run"):
        Engine(model, tok, cfg(tmp_path, max_steps=2, save_every=1, keep_last=1)).fit(DATA)
    assert list_checkpoints(tmp_path / "checkpoints") == before
    # asked to overwrite: the new run's own newest checkpoint survives its pruning and `latest` finds it
    Engine(model, tok, cfg(tmp_path, max_steps=2, save_every=1, keep_last=1, overwrite_output_dir=True)).fit(DATA)
    assert list_checkpoints(tmp_path / "checkpoints") == ["step-00000002"]
    assert find_checkpoint(str(tmp_path / "checkpoints"), "latest").endswith("step-00000002")


def test_resuming_from_an_older_checkpoint_never_deletes_its_own_newest(tmp_path):
    model, tok = tiny_bart()
    Engine(model, tok, cfg(tmp_path, max_steps=6, save_every=2, keep_last=5)).fit(DATA)
    model, tok = tiny_bart()
    older = str(tmp_path / "checkpoints" / "step-00000002")
    Engine(model, tok, cfg(tmp_path, max_steps=6, save_every=1, keep_last=1)).fit(DATA, resume=older)
    path = find_checkpoint(str(tmp_path / "checkpoints"), "latest")
    assert path.endswith("step-00000006") and os.path.isdir(path)


# --- 3. two processes on one output_dir -----------------------------------------------------------------

def test_a_second_process_on_the_output_dir_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from finetune.store.outputs import RunLock
        RunLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        model, tok = tiny_bart()
        with pytest.raises(OutputDirError, match=f"in use by another training run \\(pid {holder.pid} "):
            Engine(model, tok, cfg(tmp_path)).fit(DATA)
        assert not (tmp_path / "metrics.jsonl").exists()  # nothing written by the refused run
    finally:
        holder.kill()  # the kernel releases the lock of a dead process
        holder.wait()
    Engine(model, tok, cfg(tmp_path)).fit(DATA)
    assert (tmp_path / "model" / "config.json").exists()


# --- 4. everything that can be checked is checked before the first step ---------------------------------

def _no_training_happened(out):
    return not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_missing_eval_file_fails_before_training(tmp_path):
    model, tok = tiny_bart()
    with pytest.raises(DataError, match="typo.jsonl: no such file"):
        Engine(model, tok, cfg(tmp_path / "out", save_every=1)).fit(DATA, eval=str(tmp_path / "typo.jsonl"))
    assert _no_training_happened(tmp_path / "out")


def test_bad_eval_row_fails_before_training(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "a"}\n')
    model, tok = tiny_bart()
    with pytest.raises(DataError, match=r"eval.jsonl:2: missing field"):
        Engine(model, tok, cfg(tmp_path / "out", save_every=1)).fit(DATA, eval=str(bad))
    assert _no_training_happened(tmp_path / "out")


def test_output_dir_that_is_a_file_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    model, tok = tiny_bart()
    with pytest.raises(OutputDirError, match="is a file"):
        Engine(model, tok, cfg(tmp_path / "file")).fit(DATA)
    with pytest.raises(OutputDirError, match="not writable"):
        Engine(model, tok, cfg(tmp_path / "file" / "sub")).fit(DATA)


def test_a_failure_during_evaluation_keeps_the_training(tmp_path):
    model, tok = tiny_bart()
    engine = Engine(model, tok, cfg(tmp_path, max_steps=4, eval_every=2, save_every=100))
    calls = []

    def broken_evaluate(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("disk full while writing predictions")

    engine.evaluate = broken_evaluate  # stands in for any fault inside evaluation
    with pytest.raises(TrainingStopped, match="evaluation at step 2 failed .*disk full.*saved"):
        engine.fit(DATA, eval=DATA[:4])
    assert calls and list_checkpoints(tmp_path / "checkpoints") == ["step-00000002"]
    reloaded, _ = load_seq2seq(str(tmp_path / "model"))
    assert torch.allclose(logits(reloaded, tok), logits(model, tok), atol=1e-6)


# --- 5. divergence keeps the last good checkpoint ------------------------------------------------------

def test_divergence_keeps_the_checkpoint_written_before_it(tmp_path):
    model, tok = tiny_bart()
    config = cfg(tmp_path, lr=1e6, max_steps=40, save_every=1, keep_last=1, max_nonfinite_steps=3,
                 max_grad_norm=None)
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(TrainingStopped) as stopped:
        Engine(model, tok, config).fit(DATA)
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert kept, "no checkpoint survived the divergence"
    state = json.loads((tmp_path / "checkpoints" / kept[-1] / "state.json").read_text())
    assert state["nonfinite_in_a_row"] == 0  # written before the first non-finite step
    assert kept[-1] in str(stopped.value)


# --- 6. TSV, CSV, encodings ----------------------------------------------------------------------------

def test_tsv_quotes_are_literal_and_each_line_is_a_row(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text('"teh\tthe\nrecieve"\treceive\n"Hello" she sayd\t"Hello" she said\n', encoding="utf-8")
    assert read_pairs(str(path)) == [('"teh', "the"), ('recieve"', "receive"), ('"Hello" she sayd', '"Hello" she said')]


def test_csv_header_after_a_byte_order_mark_is_a_header(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes("\ufeffsource,target\nteh,the\n\"a, b\",\"c \"\"d\"\"\"\n".encode("utf-8"))
    assert read_pairs(str(path)) == [("teh", "the"), ("a, b", 'c "d"')]


@pytest.mark.parametrize("ext", ["jsonl", "tsv", "csv"])
def test_bytes_that_are_not_utf8_name_file_line_and_byte(tmp_path, ext):
    rows = {"jsonl": b'{"source": "a", "target": "b"}\n{"source": "caf\xe9", "target": "b"}\n',
            "tsv": b"a\tb\ncaf\xe9\tb\n", "csv": b"a,b\ncaf\xe9,b\n"}[ext]
    path = tmp_path / f"data.{ext}"
    path.write_bytes(rows)
    with pytest.raises(DataError, match=rf"data.{ext}:2: not UTF-8 text \(byte 0xe9"):
        read_pairs(str(path))


def test_a_folder_given_as_data_is_refused(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(DataError, match="is a folder"):
        read_pairs(str(tmp_path / "d.jsonl"))


# --- 7. model writes survive a kill at any instant ----------------------------------------------------

def test_a_save_interrupted_between_two_renames_is_repaired(tmp_path, monkeypatch):
    import finetune.store.outputs as outputs

    model, tok = tiny_bart()
    engine = Engine(model, tok, cfg(tmp_path))
    path = engine.save(str(tmp_path / "model"))
    monkeypatch.setattr(outputs, "exchange_dirs", lambda a, b: False)  # a system without renameat2
    real_replace = os.replace

    def killed_after_first_rename(src, dst):
        real_replace(src, dst)
        if dst.endswith(".old"):
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(outputs.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        engine.save(path)
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    assert not os.path.exists(path) and os.path.isdir(path + ".old")
    load_seq2seq(path)  # the previous model is put back
    assert os.path.isdir(path)
    engine.save(path)  # and the next save neither loses it nor leaves the old copy behind
    assert os.path.isdir(path) and not os.path.exists(path + ".old")


def test_a_save_that_fails_midway_leaves_the_previous_model(tmp_path, monkeypatch):
    import finetune.store.export as export

    model, tok = tiny_bart()
    engine = Engine(model, tok, cfg(tmp_path))
    path = engine.save(str(tmp_path / "model"))
    before = logits(load_seq2seq(path)[0], tok)

    def dies(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_plain", dies)
    with pytest.raises(OSError):
        engine.save(path)
    assert torch.equal(logits(load_seq2seq(path)[0], tok), before)


# --- 8. adapters ------------------------------------------------------------------------------------------

def _adapter(tmp_path, **lora):
    model, tok = tiny_bart()
    apply_lora(model, r=4, dropout=0.0, **lora)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight)
    return model, tok, save_adapter(model, str(tmp_path / "adapter"), format="peft")


@pytest.mark.parametrize("content,match", [("{not json", "not valid JSON"), ('{"peft_type": "LORA"}', "'r' is missing"),
                                           ('{"peft_type": "LORA", "r": "4", "lora_alpha": 8}', "'r' must be int"),
                                           ("[1, 2]", "expected a JSON object")])
def test_malformed_adapter_config_is_refused_naming_the_file(tmp_path, content, match):
    _, _, folder = _adapter(tmp_path)
    (tmp_path / "adapter" / "adapter_config.json").write_text(content)
    model, _ = tiny_bart()
    with pytest.raises(ValueError, match=match) as err:
        load_adapter(model, folder)
    assert "adapter_config.json" in str(err.value)


def test_adapter_alpha_replaces_the_model_layers_alpha(tmp_path):
    trained, tok, folder = _adapter(tmp_path)
    model, _ = tiny_bart()
    apply_lora(model, r=4, alpha=64, dropout=0.0)  # other alpha than the adapter's 32
    load_adapter(model, folder)
    assert torch.allclose(logits(model, tok), logits(trained, tok), atol=1e-6)


def test_peft_rank_and_alpha_patterns_match_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tok = tiny_bart()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        rank_pattern={"encoder.layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 16},
                        init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    expected = logits(peft_model, tok)
    model, _ = tiny_bart()
    load_adapter(model, str(tmp_path / "peft"))
    assert lora_layers(model)["model.encoder.layers.0.self_attn.q_proj"].r == 2
    assert torch.allclose(logits(model, tok), expected, atol=1e-5)


def test_a_failed_adapter_load_leaves_the_model_untouched(tmp_path):
    from safetensors.torch import load_file, save_file

    _, tok, folder = _adapter(tmp_path)
    weights = os.path.join(folder, "adapter_model.safetensors")
    state = load_file(weights)
    key = next(k for k in state if "lora_B" in k)
    state[key] = torch.zeros(3, 3)
    save_file(state, weights)
    model, _ = tiny_bart()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="shape"):
        load_adapter(model, folder)
    assert not lora_layers(model) and not hasattr(model, "lora_config")
    assert model.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("key, value, message", [
    ("bias", "all", "bias='all'"), ("lora_bias", True, "lora_bias=True"),
    ("use_dora", True, "missing LoRA tensors .*lora_magnitude_vector"),  # DoRA is supported: its magnitudes are not there
])
def test_unsupported_peft_settings_are_refused_not_ignored(tmp_path, key, value, message):
    _, _, folder = _adapter(tmp_path)
    path = os.path.join(folder, "adapter_config.json")
    meta = json.load(open(path))
    meta[key] = value
    json.dump(meta, open(path, "w"))
    model, _ = tiny_bart()
    with pytest.raises(ValueError, match=message):
        load_adapter(model, folder)


# --- 9. checkpoints ---------------------------------------------------------------------------------------

def _two_checkpoints(tmp_path):
    model, tok = tiny_bart()
    Engine(model, tok, cfg(tmp_path, max_steps=4, save_every=2, keep_last=5)).fit(DATA)
    return tmp_path / "checkpoints"


def test_malformed_manifest_in_the_newest_falls_back_to_the_previous(tmp_path):
    checkpoints = _two_checkpoints(tmp_path)
    (checkpoints / "step-00000004" / "manifest.json").write_text("{broken")
    with pytest.warns(UserWarning, match="manifest.json: unreadable"):
        assert find_checkpoint(str(checkpoints), "latest").endswith("step-00000002")


def test_empty_latest_pointer_uses_the_newest_good_checkpoint(tmp_path):
    checkpoints = _two_checkpoints(tmp_path)
    (checkpoints / "latest").write_text("")
    with pytest.warns(UserWarning, match="empty or damaged"):
        assert find_checkpoint(str(checkpoints), "latest").endswith("step-00000004")


def test_explicit_checkpoint_path_that_does_not_exist(tmp_path):
    model, tok = tiny_bart()
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        Engine(model, tok, cfg(tmp_path)).fit(DATA, resume=str(tmp_path / "checkpoints" / "step-00000009"))
    assert not (tmp_path / "metrics.jsonl").exists()


# --- 10. config and generation lengths --------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("lr", float("nan")), ("eval_batch_size", -1),
                                         ("output_dir", ""), ("batch_size", 2.5), ("lr", "3e-4"),
                                         ("warmup_steps", -1), ("max_grad_norm", float("inf")), ("eps", 0.0),
                                         ("eval_every", 0), ("epochs", True), ("lr_overrides", {"(": 1e-3})])
def test_every_bad_config_value_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}"):
        TrainConfig(**{field: value})


def test_generation_length_beyond_the_decoder_positions_is_refused(tmp_path):
    model, tok = tiny_bart()  # 128 learned positions
    with pytest.raises(ValueError, match=r"TrainConfig.max_new_tokens=129 exceeds the model's 128"):
        Engine(model, tok, cfg(tmp_path, max_new_tokens=129))
    engine = Engine(model, tok, cfg(tmp_path))
    with pytest.raises(ValueError, match="max_new_tokens=500 exceeds"):
        engine.generate(["abc"], max_new_tokens=500)
    assert len(engine.generate(["abc"], max_new_tokens=128)) == 1


def test_run_files_parse_on_python_310_through_tomli(monkeypatch):
    import importlib
    import types

    import finetune.run_config as run_config

    fake = types.ModuleType("tomli")
    fake.loads, fake.load, fake.TOMLDecodeError = (lambda s: {"v": 1}), (lambda f: {}), ValueError
    monkeypatch.setitem(sys.modules, "tomli", fake)
    monkeypatch.setattr(sys, "version_info", (3, 10, 12))
    try:
        reloaded = importlib.reload(run_config)
        assert reloaded.tomllib is fake
    finally:
        monkeypatch.undo()
        importlib.reload(run_config)


# --- 11. bert2bert built the tutorial way keeps BERT's pooler ---------------------------------------------

def test_bert2bert_from_encoder_decoder_pretrained_trains(tmp_path, capsys):
    from transformers import BertConfig, BertModel, EncoderDecoderModel

    from finetune.models import char_tokenizer

    tok = char_tokenizer("bert")
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128))
    bert.save_pretrained(str(tmp_path / "bert"))
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(str(tmp_path / "bert"), str(tmp_path / "bert"))
    assert model.encoder.pooler is not None
    model.config.decoder_start_token_id, model.config.eos_token_id = tok.cls_token_id, tok.sep_token_id
    model.config.pad_token_id = tok.pad_token_id
    Engine(model, tok, cfg(tmp_path / "out", progress=True)).fit(DATA)
    assert "encoder.pooler is unused" in capsys.readouterr().out
    assert not any(p.requires_grad for p in model.encoder.pooler.parameters())
    assert any(p.requires_grad for n, p in model.named_parameters() if "pooler" not in n)


# --- beyond the list ---------------------------------------------------------------------------------------

def test_a_json_array_file_reads_as_pairs(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"source": "teh", "target": "the"}, {"source": "wrod", "target": "word"}]))
    assert read_pairs(str(path)) == [("teh", "the"), ("wrod", "word")]
    path.write_text(json.dumps([{"source": "teh", "target": "the"}, {"source": "wrod"}]))
    with pytest.raises(DataError, match=r"pairs.json: item \[1\]: missing field"):
        read_pairs(str(path))


def test_resume_true_means_latest(tmp_path):
    import shutil

    model, tok = tiny_bart()
    Engine(model, tok, cfg(tmp_path, max_steps=4, save_every=1, keep_last=5)).fit(DATA)
    for step in (3, 4):  # as if the run had stopped after step 2
        shutil.rmtree(tmp_path / "checkpoints" / f"step-0000000{step}")
    model, tok = tiny_bart()
    history = Engine(model, tok, cfg(tmp_path, max_steps=4, save_every=1, keep_last=5, log_every=1)).fit(DATA, resume=True)
    assert [r["step"] for r in history["train"]] == [3, 4]


def test_lora_applied_twice_says_so(tmp_path):
    model, _ = tiny_bart()
    apply_lora(model, r=4)
    with pytest.raises(ValueError, match="already have LoRA"):
        apply_lora(model, r=4)


def test_save_onto_a_file_is_refused(tmp_path):
    model, tok = tiny_bart()
    (tmp_path / "model").write_text("not a folder")
    with pytest.raises(OutputDirError, match="is a file"):
        Engine(model, tok, cfg(tmp_path)).save(str(tmp_path / "model"))
    assert (tmp_path / "model").read_text() == "not a folder"


@pytest.mark.parametrize("call,match", [(lambda e: e.generate([1, 2]), "texts\\[0\\] is int"),
                                        (lambda e: e.generate(["a"], num_beams=0), "num_beams=0"),
                                        (lambda e: e.overfit_batch(DATA[:4], steps=0), "steps must be"),
                                        (lambda e: e.evaluate([]), "no pairs given"),
                                        (lambda e: e.fit(DATA, resume=3), "resume must be")])
def test_bad_arguments_to_the_engine(tmp_path, call, match):
    model, tok = tiny_bart()
    with pytest.raises((ValueError, TypeError), match=match):
        call(Engine(model, tok, cfg(tmp_path)))


@pytest.mark.parametrize("kw,match", [({"mask_rate": "0.3"}, "mask_rate"), ({"poisson_lambda": float("nan")}, "poisson"),
                                      ({"rotate": 1}, "rotate"), ({"protect": 3}, "protect")])
def test_bad_noise_settings_name_the_field(kw, match):
    from finetune import NoiseConfig

    with pytest.raises(ValueError, match=f"NoiseConfig.{match}"):
        NoiseConfig(**kw)


def test_engine_refuses_what_is_not_a_model_tokenizer_or_config(tmp_path):
    model, tok = tiny_bart()
    with pytest.raises(TypeError, match="model must be"):
        Engine(object(), tok)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        Engine(model, tok, {"lr": 1e-3})
    config = cfg(tmp_path)
    config.lr = -1.0  # changed after it was made: checked again by the engine
    with pytest.raises(ValueError, match="TrainConfig.lr=-1.0"):
        Engine(model, tok, config)


def test_cli_reports_broken_models_and_paths_in_one_line(tmp_path, monkeypatch, capsys):
    model, tok = tiny_bart()
    model.save_pretrained(str(tmp_path / "trunc"))
    tok.save_pretrained(str(tmp_path / "trunc"))
    weights = tmp_path / "trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "d.jsonl").write_text('{"source": "teh", "target": "the"}\n' * 8)
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "run.toml").write_text('[model]\nname = "tiny-bart"\n[data]\ntrain = "d.jsonl"\n'
                                       '[train]\nmax_steps = 1\nbatch_size = 4\nprogress = false\n'
                                       'output_dir = "out"\n')
    (tmp_path / "out").write_text("a file where the output folder should be")
    cases = [(("eval", "--model", "trunc", "--data", "d.jsonl"), "trunc/model.safetensors: damaged weights file"),
             (("eval", "--model", "trunc", "--data", "folder.jsonl"), "is a folder"),
             (("train", "run.toml"), "exists and is a file"),
             (("train", "run.toml", "--set", "train.output_dir='o2'", "--resume", "latest"), "no checkpoint to resume"),
             (("train", "run.toml", "--set", "train.lr=inf"), "TrainConfig.lr=inf")]
    monkeypatch.chdir(tmp_path)
    from finetune.cli import main

    for args, message in cases:  # in this process: `python -m finetune ARGS` is main(ARGS) (test_cli starts one)
        code, err = main(list(args)), capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("finetune ")]
        assert code == 2, (args, err[-500:])
        assert "Traceback" not in err and len(errors) == 1 and message in errors[0], (args, err[-500:])


def test_overwrite_leaves_nothing_stale_from_the_earlier_run(tmp_path):
    model, tok = tiny_bart()
    apply_lora(model, r=4)
    Engine(model, tok, cfg(tmp_path)).fit(DATA, eval=DATA[:4])
    assert (tmp_path / "adapter").is_dir() and (tmp_path / "eval_predictions.jsonl").exists()
    model, tok = tiny_bart()  # a full fine-tuning run replaces the LoRA run: its adapter must not stay beside it
    Engine(model, tok, cfg(tmp_path, overwrite_output_dir=True)).fit(DATA)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "eval_predictions.jsonl").exists()
    assert (tmp_path / "model" / "config.json").exists()
