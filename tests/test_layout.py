"""The package's shape, as the architecture asks for it: small modules, no private name used outside the module
that defines it, an engine that names no method or wrapper, LoRA's defaults written once, methods declared once."""
import ast
import inspect
import os
import re

import pytest

from finetune.methods import lora
from finetune.methods import METHODS, method, settings_of
from finetune.run_config import MethodSection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "finetune")


def sources(*folders):
    for folder in folders:
        for path, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(path, name)


def test_no_module_of_the_package_is_over_350_lines():
    long = {os.path.basename(p): n for p in sources("finetune") if (n := len(open(p).read().splitlines())) > 350}
    assert not long


def test_no_private_name_is_used_outside_the_module_that_defines_it():
    defined = {}  # _name -> module files
    for path in sources("finetune"):
        for node in ast.walk(ast.parse(open(path).read())):
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    defined.setdefault(name, set()).add(path)
    outside = []
    for path in sources("finetune", "tests", "benchmarks", "examples"):
        text = open(path).read()
        outside += [(name, os.path.relpath(path, ROOT)) for name, homes in defined.items()
                    if path not in homes and re.search(rf"(?<![\w.]){re.escape(name)}\b|\.{re.escape(name)}\b", text)]
    assert not outside


def test_the_engine_names_no_method_wrapper_or_quantisation():
    text = open(os.path.join(PACKAGE, "engine.py")).read()
    named = [w for w in ("lora", "dora", "bitfit", "int8", "int4", "4-bit", "quant", "adapter", "LinearWithAddedBias")
             if re.search(w, text, re.IGNORECASE)]
    assert not named


def test_export_and_checkpoints_name_no_wrapper_class():
    for name in ("export.py", "checkpoint.py"):
        text = open(os.path.join(PACKAGE, name)).read()
        assert not re.search(r"LoRALinear|Int8Linear|Int4Linear|LinearWithAddedBias|is_quantized", text), name


def test_loras_defaults_are_written_once():
    defaults = {"r": lora.DEFAULT_R, "alpha": lora.DEFAULT_ALPHA, "dropout": lora.DEFAULT_DROPOUT}
    for fn in (lora.LoRALinear, lora.apply_lora, lora.lora_plan):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in defaults} == defaults, fn
    for name in METHODS:
        settings = settings_of(name)
        if "lora_r" in settings:
            assert (settings["lora_r"], settings["lora_alpha"], settings["lora_dropout"]) == tuple(defaults.values())
    literal = re.compile(r"(lora_r|\br)\s*[:=]\s*(int\s*=\s*)?16\b")
    hits = [os.path.relpath(p, ROOT) for p in sources("finetune", "examples", "benchmarks")
            if literal.search(open(p).read())]
    assert not hits


def test_run_files_read_a_methods_settings_from_its_declaration():
    section = MethodSection.from_table({"name": "qlora", "lora_r": 8, "quant_type": "fp4"}, "run.toml [method]")
    assert section.settings == {"lora_r": 8, "quant_type": "fp4"}
    with pytest.raises(ValueError, match=r"\[method\] lora_r = 0: must be >= 1"):
        MethodSection.from_table({"name": "lora", "lora_r": 0}, "run.toml [method]")
    assert method("lora").lr == method("bitfit").lr and method("full").lr < method("lora").lr
