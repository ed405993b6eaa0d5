"""The package's shape, as docs/architecture.md draws it: sub-packages by job in layers (a sub-package imports
only the ones below it), no circles, short functions, no private name used outside the module that defines it, an
engine that names no method or wrapper, LoRA's defaults written once, methods declared once."""
import ast
import inspect
import os
import re

import pytest

from finetune.methods import METHODS, lora, method, settings_of
from finetune.run_config import MethodSection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "finetune")

# Which parts of the package each part may import (the layers, top to bottom). The shared leaves import nothing of
# the package; the top floor (the `finetune` command, run files, the package's face) may import anything.
LEAVES = {"checks", "cpu_caches", "distributed", "families", "patterns"}
MAY_IMPORT = {
    "store": set(),
    "data": set(),
    "methods": {"store"},
    "models": {"methods", "store"},
    "evaluate": {"data", "models"},
    "train": {"data", "evaluate", "methods", "models", "store"},
}
TOP = {"__init__", "__main__", "cli", "run_config", "run_build"}
FUNCTION_LINES = 60


def sources(*folders):
    for folder in folders:
        for path, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(path, name)


def module_of(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def part_of(module: str) -> str:
    """finetune.data.corpus -> data; finetune.cli -> cli; finetune -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: str) -> set[str]:
    """The finetune modules a file imports, at its top or inside functions (a package import names the package)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "finetune":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = os.path.exists(os.path.join(ROOT, *candidate.split(".")) + ".py") or \
                    os.path.isdir(os.path.join(ROOT, *candidate.split(".")))
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "finetune")
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.add("relative import")
    return found


GRAPH = {module_of(p): imports_of(p) for p in sources("finetune")}


def test_the_package_imports_absolutely():
    assert not [m for m, deps in GRAPH.items() if "relative import" in deps]


def test_each_part_imports_only_the_parts_below_it():
    wrong = []
    for module, deps in GRAPH.items():
        here = part_of(module)
        if here in TOP:
            continue
        allowed = LEAVES if here in LEAVES else MAY_IMPORT[here] | {here} | LEAVES
        wrong += [(module, dep) for dep in deps if part_of(dep) not in allowed and dep != "finetune"]
        wrong += [(module, dep) for dep in deps if dep == "finetune"]  # the face is for users, not for the parts
    assert not wrong


def test_every_sub_package_is_in_the_layers():
    parts = {part_of(m) for m in GRAPH}
    assert parts <= set(MAY_IMPORT) | LEAVES | TOP, parts - set(MAY_IMPORT) - LEAVES - TOP


def test_no_circles_between_modules():
    def visit(module, path):
        if module in path:
            return path[path.index(module):] + [module]
        for dep in sorted(GRAPH.get(module, ())):
            if dep in GRAPH and part_of(dep) not in TOP:
                cycle = visit(dep, path + [module])
                if cycle:
                    return cycle
        return None

    cycles = [c for m in GRAPH if part_of(m) not in TOP and (c := visit(m, []))]
    assert not cycles


def test_no_function_is_over_60_lines():
    long = []
    for path in sources("finetune"):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > FUNCTION_LINES:
                    long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({lines} lines)")
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


def test_no_comment_narrates_history_or_cites_a_file_users_never_see():
    pattern = re.compile(r"DESIGN\.md|its old home|\(was written|formerly|used to live")
    hits = [os.path.relpath(p, ROOT) for p in sources("finetune") if pattern.search(open(p).read())]
    assert not hits


def test_the_engine_names_no_method_wrapper_or_quantisation():
    text = open(os.path.join(PACKAGE, "train", "engine.py")).read()
    named = [w for w in ("lora", "dora", "bitfit", "int8", "int4", "4-bit", "quant", "adapter", "LinearWithAddedBias")
             if re.search(w, text, re.IGNORECASE)]
    assert not named


def test_the_engine_does_not_ask_which_kind_of_data_it_trains_on():
    text = open(os.path.join(PACKAGE, "train", "engine.py")).read()
    assert not re.search(r"\bStream\b|is_stream|streaming|sampler", text)


def test_export_and_checkpoints_name_no_wrapper_class():
    for path in (("store", "export.py"), ("train", "checkpoint.py")):
        text = open(os.path.join(PACKAGE, *path)).read()
        assert not re.search(r"LoRALinear|Int8Linear|Int4Linear|LinearWithAddedBias|is_quantized", text), path


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
