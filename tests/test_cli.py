"""The `finetune` command: train / eval / generate / report, and the run-file errors."""
import json
import os
import subprocess
import sys

import pytest

from finetune.cli import main
from finetune.run_config import load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """
[model]
name = "tiny-bart"
[method]
name = "{method}"
[data]
train = "{train}"
eval = "{train}"
[train]
lr = 3e-3
epochs = 30
batch_size = 8
output_dir = "{out}"
log_every = 10
progress = false
num_beams = 1
"""


def write_run(tmp_path, method="full"):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n"
                            for s, t in [("teh", "the"), ("adress", "address"), ("wich", "which")]))
    out = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(TINY.format(method=method, train=data, out=out))
    return config, data, out


def test_train_eval_generate_report(tmp_path, capsys):
    config, data, out = write_run(tmp_path)
    assert main(["train", str(config), "--set", "train.epochs=250", "--set", "train.lr=1e-2"]) == 0
    assert (out / "model" / "model.safetensors").exists()
    assert json.loads((out / "run_config.json").read_text())["train"]["epochs"] == 250
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "model"), "--data", str(data), "--num-beams", "2"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["exact_match"] == 1.0
    assert main(["generate", "--model", str(out / "model"), "teh", "wich"]) == 0
    assert capsys.readouterr().out.splitlines() == ["teh\tthe", "wich\twhich"]
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "trainable parameters:" in report and "exact match 1.000" in report
    assert (out / "report.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["bitfit", "lora", "frozen-encoder", "dora", "qlora"])
def test_train_methods(tmp_path, method):
    config, _, out = write_run(tmp_path, method)
    assert main(["train", str(config), "--set", "train.epochs=1"]) == 0
    report = (out / "trainable.txt").read_text()
    assert "trainable parameters:" in report and "(100.0000%)" not in report


@pytest.mark.parametrize("body,message", [
    ("[train]\nlr = 1e-4\nlearning_rate = 3\n", r"\[train\]: unknown key 'learning_rate'"),
    ("[train]\nlr = \"fast\"\n", r"\[train\]: key 'lr' has str 'fast'"),
    ("[method]\nname = \"prefix-tuning\"\n", r"\[method\]: \[method\] name = 'prefix-tuning': choose one of"),
    ("[method]\nlora_rank = 4\n", r"\[method\]: unknown key 'lora_rank'"),
    ("[model]\ndropout = 1.5\n", r"\[model\]: \[model\] dropout = 1.5: must be in \[0, 1\)"),
    ("[method]\nname = \"qlora\"\nquant_type = \"nf5\"\n", r"\[method\]: \[method\] quant_type = 'nf5': choose"),
    ("[method]\nname = \"qlora\"\ndouble_quant = 1\n", r"\[method\]: key 'double_quant' has int 1"),
    ("[method]\nname = \"lora\"\nquant_type = \"fp4\"\n", r"method 'lora' has no such setting"),
    ("[modle]\nname = \"x\"\n", r"unknown section \[modle\]"),
    ("[train]\nlr = \n", r"invalid TOML.*line 2"),
    ("[noise]\nmask_rate = 2.0\n", r"\[noise\]: NoiseConfig.mask_rate=2.0"),
    ("[train]\nbatch_size = 0\n", r"TrainConfig.batch_size=0: must be >= 1"),
])
def test_config_errors_name_the_key(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_run_config(str(path))


def test_model_dropout_reaches_every_dropout_layer(tmp_path):
    import torch

    from finetune.run_build import build_run

    config, _, _ = write_run(tmp_path)
    run = load_run_config(str(config), ["model.dropout=0.0"])
    model = build_run(run).model
    assert model.config.dropout == 0.0 and model.config.attention_dropout == 0.0
    rates = [getattr(m, k) for m in model.modules() for k in ("dropout", "attention_dropout", "activation_dropout")
             if isinstance(getattr(m, k, None), float)]  # BART: functional dropout at rates kept on the layers
    assert rates and all(r == 0.0 for r in rates)
    model.train()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 2]]), "labels": torch.tensor([[8, 9, 2]])}
    assert torch.equal(model(**batch).logits, model(**batch).logits)  # no dropout left: training mode is exact


def test_set_dropout_on_bert2bert_and_t5():
    import torch

    from finetune.models import set_dropout, tiny_bert2bert, tiny_t5

    for model, _ in (tiny_bert2bert(), tiny_t5()):
        set_dropout(model, 0.0)
        layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert layers and all(m.p == 0.0 for m in layers)
    with pytest.raises(ValueError, match="dropout must be a number in"):
        set_dropout(model, 1.0)


def test_set_overrides_and_bad_set(tmp_path):
    config, _, _ = write_run(tmp_path)
    run = load_run_config(str(config), ["train.lr=0.5", "method.name=lora", "data.train_limit=2"])
    assert run.train.lr == 0.5 and run.method.name == "lora" and run.data.train_limit == 2
    with pytest.raises(ValueError, match="expected section.key=value"):
        load_run_config(str(config), ["lr=3"])


def test_cli_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearning_rate = 1\n")
    out = subprocess.run([sys.executable, "-m", "finetune", "train", str(bad)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert "unknown key 'learning_rate'" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "finetune", "eval", "--model", str(tmp_path / "nope"), "--data", "x"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "not a folder" in out.stderr


def test_shipped_configs_parse():
    folder = os.path.join(ROOT, "examples", "configs")
    names = sorted(os.listdir(folder))
    assert "spelling_minilm.toml" in names
    for name in names:
        load_run_config(os.path.join(folder, name))


def test_a_run_file_trains_packed(tmp_path):
    """`pack = true` in [train] (here through --set) reaches the engine: the run trains on packed rows."""
    config, _, out = write_run(tmp_path)
    assert main(["train", str(config), "--set", "train.pack=true", "--set", "train.epochs=2",
                 "--set", "train.log_every=1"]) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    assert train and all(r["padding_fraction"] == 0.0 for r in train)
    assert json.loads((out / "run_config.json").read_text())["train"]["pack"] is True
