"""Generation settings (length_penalty, early_stopping, no_repeat_ngram_size, min_new_tokens, repetition_penalty):
each reaches transformers' `generate` with the value set, the engine's outputs equal `generate` called directly,
bad values are refused before training, and the CLI's flags carry them."""
import json

import pytest
import torch

from finetune import Engine, TrainConfig
from finetune.cli import main as cli_main
from finetune.evaluate.generation import SETTINGS
from finetune.models import tiny_bart, tiny_bert2bert

TEXTS = ["teh wrod 3", "abc def ghi jkl", "a"]
SET = {"length_penalty": 2.0, "early_stopping": True, "no_repeat_ngram_size": 2, "min_new_tokens": 3,
       "repetition_penalty": 1.3}


def direct(model, tokenizer, engine, num_beams, **settings):
    """transformers' generate called by hand with the engine's special tokens."""
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    t = engine.tokens
    with torch.inference_mode():
        out = model.generate(**enc, num_beams=num_beams, max_new_tokens=12, decoder_start_token_id=t.decoder_start,
                             eos_token_id=t.eos, pad_token_id=t.pad, do_sample=False, **settings)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("builder", [tiny_bart, tiny_bert2bert])
@pytest.mark.parametrize("name", SETTINGS)
def test_each_setting_reaches_generate_and_matches_a_direct_call(tmp_path, builder, name):
    torch.manual_seed(0)
    model, tokenizer = builder()
    cfg = TrainConfig(num_beams=3, max_new_tokens=12, output_dir=str(tmp_path), progress=False, **{name: SET[name]})
    engine = Engine(model, tokenizer, cfg)
    seen = []
    real = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    model.generate = spy
    ours = engine.generate(TEXTS)
    assert seen and seen[0][name] == SET[name]
    assert all(k not in seen[0] for k in SETTINGS if k != name)  # unset: the checkpoint's generation config
    model.generate = real
    assert ours == direct(model, tokenizer, engine, 3, **{name: SET[name]})


def test_settings_change_the_output_and_are_recorded_with_the_metrics(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = tiny_bart()
    plain = Engine(model, tokenizer, TrainConfig(num_beams=2, max_new_tokens=12, output_dir=str(tmp_path / "a"),
                                                 progress=False)).generate(TEXTS)
    engine = Engine(model, tokenizer, TrainConfig(num_beams=2, max_new_tokens=12, output_dir=str(tmp_path / "b"),
                                                  progress=False, min_new_tokens=8, no_repeat_ngram_size=1))
    assert engine.generate(TEXTS) != plain
    result = engine.evaluate([("abc", "abd"), ("teh", "the")])
    assert result["min_new_tokens"] == 8 and result["no_repeat_ngram_size"] == 1
    record = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")][-1]
    assert record["min_new_tokens"] == 8 and record["no_repeat_ngram_size"] == 1


def test_greedy_evaluations_leave_beam_only_settings_out(tmp_path):
    """eval_num_beams=1 during training with length_penalty set for the final beam search: the greedy calls get no
    beam-only setting (transformers would warn), the beam ones do."""
    model, tokenizer = tiny_bart()
    engine = Engine(model, tokenizer, TrainConfig(num_beams=2, length_penalty=0.5, max_new_tokens=6,
                                                  output_dir=str(tmp_path), progress=False))
    seen = []
    real = model.generate
    model.generate = lambda *a, **k: seen.append(k) or real(*a, **k)
    engine.generate(["abc"], num_beams=1)
    engine.generate(["abc"])
    assert "length_penalty" not in seen[0] and seen[1]["length_penalty"] == 0.5


@pytest.mark.parametrize("settings, message", [
    ({"length_penalty": float("nan"), "num_beams": 2}, "length_penalty=nan: must be a finite number"),
    ({"length_penalty": 2.0}, "acts in beam search only"),
    ({"early_stopping": True}, "acts in beam search only"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size=-1: must be an integer >= 0"),
    ({"min_new_tokens": 65}, "min_new_tokens=65 exceeds max_new_tokens=64"),
    ({"min_new_tokens": -2}, "min_new_tokens=-2: must be an integer >= 0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty=0.0: must be a number > 0"),
    ({"repetition_penalty": "high"}, "repetition_penalty='high': expected"),
])
def test_bad_generation_settings_are_refused_by_the_config(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        TrainConfig(**settings)


def test_a_beam_only_setting_is_accepted_where_the_training_evaluations_use_beams():
    TrainConfig(eval_num_beams=2, length_penalty=1.5)


def test_cli_generate_takes_the_settings_and_refuses_a_bad_one_before_loading(tmp_path, capsys):
    model, tokenizer = tiny_bart()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert cli_main(["generate", "--model", str(tmp_path / "m"), "--num-beams", "2", "--no-repeat-ngram-size", "1",
                     "--min-new-tokens", "4", "--length-penalty", "0.8", "--early-stopping", "abc"]) == 0
    assert capsys.readouterr().out.startswith("abc\t")
    assert cli_main(["generate", "--model", str(tmp_path / "m"), "--min-new-tokens", "99", "abc"]) == 2
    assert "min_new_tokens=99 exceeds max_new_tokens=64" in capsys.readouterr().err
