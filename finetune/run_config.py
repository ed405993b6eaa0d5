"""The TOML run file of `finetune train`: model, method, data, train (TrainConfig) and noise sections.

    [model]   name = "minilm" | "tiny-bart" | "tiny-t5" | "tiny-bert2bert" | a folder or hub name
              bert2bert = true   (warm-start an EncoderDecoderModel from the BERT checkpoint `name`)
              new_lr = 1e-3      (learning rate of the newly initialised tensors)
              dropout = 0.0      (every dropout layer of the model; default: the checkpoint's)
    [method]  name = "full" | "frozen-encoder" | "bitfit" | "lora" | "int8-lora" | "dora" | "qlora", and its
              settings as finetune.methods declares them (lora_r, lora_alpha, ..., quant_type), freeze / unfreeze
    [data]    train = "file.jsonl" | "shards/" | "hf:PATH" | "codespell:train" | "code-summary:train", eval = ...,
              train_limit / eval_limit
    [train]   any TrainConfig field
    [noise]   any NoiseConfig field (optional)

Unknown sections and keys, and values of the wrong type, are errors naming the file, section and key.
`--set section.key=value` overrides a value (parsed as a TOML value, else taken as a string).
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field

from finetune.train.config import TrainConfig, fits

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dependency on those versions)
    import tomli as tomllib
from finetune.methods.registry import METHODS, REGISTRY, method
from finetune.data.noise import NoiseConfig


@dataclass
class ModelSection:
    name: str = "minilm"
    bert2bert: bool = False
    new_lr: float | None = None
    dropout: float | None = None  # every dropout layer of the model (None: the checkpoint's own)

    def __post_init__(self):
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"[model] dropout = {self.dropout!r}: must be in [0, 1)")


@dataclass
class MethodSection:
    """[method]: `name`, `freeze` / `unfreeze` regexes, and the method's own settings, read from its declaration
    (finetune.methods: each setting's default, type and check are written there once)."""
    name: str = "full"
    freeze: list[str] = field(default_factory=list)
    unfreeze: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # what the run file set, checked against the method

    @classmethod
    def from_table(cls, values: dict, where: str) -> "MethodSection":
        name = values.get("name", "full")
        if not isinstance(name, str) or name not in METHODS:
            raise ValueError(f"{where}: [method] name = {name!r}: choose one of {', '.join(METHODS)}")
        declared = method(name)
        any_method = {s.name for m in REGISTRY.values() for s in m.settings}
        lists = {}
        for key in ("freeze", "unfreeze"):
            value = values.get(key, [])
            if not fits(value, list[str]) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}: key '{key}' has {type(value).__name__} {value!r}, expected a list of "
                                 "regex strings")
            lists[key] = list(value)
        settings = {k: v for k, v in values.items() if k not in ("name", "freeze", "unfreeze")}
        for key in settings:
            if key not in any_method:
                raise ValueError(f"{where}: unknown key '{key}' (known: name, freeze, unfreeze, and the method's "
                                 f"settings: {', '.join(declared.defaults) or 'none'})")
            if key not in declared.defaults:
                raise ValueError(f"{where}: [method] {key}: method {name!r} has no such setting (its settings: "
                                 f"{', '.join(declared.defaults) or 'none'})")
        resolved = declared.resolve(settings, where, prefix="[method] ")
        return cls(name, lists["freeze"], lists["unfreeze"], {k: resolved[k] for k in settings})


@dataclass
class DataSection:
    train: str = "codespell:train"
    eval: str | None = None
    train_limit: int | None = None
    eval_limit: int | None = None


@dataclass
class RunConfig:
    model: ModelSection
    method: MethodSection
    data: DataSection
    train: TrainConfig
    noise: NoiseConfig | None = None


SECTIONS = {"model": ModelSection, "method": MethodSection, "data": DataSection, "train": TrainConfig,
            "noise": NoiseConfig}


def _section(cls, values: dict, where: str):
    if cls is TrainConfig:
        return TrainConfig.from_dict(values, where)
    if cls is MethodSection:
        return MethodSection.from_table(values, where)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        if key == "protect" and cls is NoiseConfig:
            if not isinstance(value, str):
                raise ValueError(f"{where}: key 'protect' must be a rule name such as \"last_word\"")
            continue
        if not fits(value, hints[key]):
            raise ValueError(f"{where}: key '{key}' has {type(value).__name__} {value!r}, expected {hints[key]}")
    try:
        return cls(**values)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def parse_override(text: str) -> tuple[str, str, object]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"--set {text!r}: expected section.key=value, e.g. train.lr=3e-4")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load_run_config(path: str, overrides=()) -> RunConfig:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML: {err}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    for name in raw:
        if name not in SECTIONS:
            raise ValueError(f"{path}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
        if not isinstance(raw[name], dict):
            raise ValueError(f"{path}: '{name}' must be a [section]")
    built = {name: _section(cls, raw.get(name, {}), f"{path} [{name}]") for name, cls in SECTIONS.items()
             if name != "noise"}
    noise = _section(NoiseConfig, raw["noise"], f"{path} [noise]") if "noise" in raw else None
    return RunConfig(noise=noise, **built)


# ---------------------------------------------------------------------------------------------
# From a run file to what the engine needs: the one path the `finetune` command and the examples share


def tiny_models() -> dict[str, str]:
    """'tiny-bart' -> 'tiny_bart': the families' tiny builders (finetune/families.py) by their run-file name."""
    from finetune.families import FAMILIES

    return {f.tiny.replace("_", "-"): f.tiny for f in FAMILIES.values() if f.tiny}


def build_model(section: ModelSection):
    """(model, tokenizer, newly initialised parameter names) for a [model] section."""
    from finetune import models

    tiny = tiny_models()
    if section.name in tiny:
        print(f"model {section.name}: a small RANDOMLY INITIALISED model with a character tokenizer")
        model, tokenizer = getattr(models, tiny[section.name])()
        return model, tokenizer, []
    if section.name == "minilm" or section.bert2bert:
        built = models.bert2bert_by_name(section.name)
        return built.model, built.tokenizer, built.new_parameters
    model, tokenizer = models.load_seq2seq(section.name)
    return model, tokenizer, []


def load_data(spec: str | None, limit: int | None, seed: int, source_field: str, target_field: str):
    """A [data] entry: a file or folder path, "hf:PATH" (a datasets.save_to_disk folder), `codespell:SPLIT` or
    `code-summary:SPLIT` (the real data built offline: finetune.data.builtin); `limit` takes the first n (the real data:
    a seeded sample). A path without a limit is passed on as it is: the engine reads and caches it
    (finetune.data.corpus)."""
    from finetune.data.pairs import read_pairs

    if spec is None:
        return None
    if spec.startswith("codespell:"):
        from finetune.data.builtin import codespell_pairs

        return codespell_pairs(spec.split(":", 1)[1], limit=limit, seed=seed)
    if spec.startswith("code-summary:"):
        from finetune.data.builtin import code_summary_pairs

        return code_summary_pairs(spec.split(":", 1)[1], limit=limit, seed=seed)
    if not limit:
        from finetune.data.sources import open_source

        open_source(spec, "[data]")  # a missing file or unknown format fails here; the engine reads it (cached)
        return spec
    return read_pairs(spec, source_field, target_field)[:limit]


@dataclass
class BuiltRun:
    model: object
    tokenizer: object
    new_parameters: list[str]
    config: TrainConfig
    train: list
    eval: list | None
    noise: NoiseConfig | None


def build_run(run: RunConfig) -> BuiltRun:
    """The model with its method applied (and [method] freeze / unfreeze), the TrainConfig with the new tensors'
    learning rate ([model] new_lr), and the data."""
    from finetune.methods.freeze import freeze, unfreeze
    from finetune.methods.registry import apply_method, new_tensor_lr

    model, tokenizer, new = build_model(run.model)
    if run.model.dropout is not None:
        from finetune.models.adjust import set_dropout

        set_dropout(model, run.model.dropout)
    apply_method(model, run.method.name, new, **run.method.settings)
    if run.method.freeze:
        freeze(model, run.method.freeze)
    if run.method.unfreeze:
        unfreeze(model, run.method.unfreeze)
    cfg = run.train
    cfg.lr_overrides = {**new_tensor_lr(new, run.model.new_lr), **cfg.lr_overrides}
    train = load_data(run.data.train, run.data.train_limit, cfg.seed, cfg.source_field, cfg.target_field)
    evaluation = load_data(run.data.eval, run.data.eval_limit, cfg.seed, cfg.source_field, cfg.target_field)
    return BuiltRun(model, tokenizer, new, cfg, train, evaluation, run.noise)


def check_setup(model, tokenizer, config, train, new_parameters=(), steps: int = 200, eval=None,
                resume: bool = False):
    """Build the engine (its special-token contract is the first check) and run `check` on it; for a fresh run
    (not `resume`), also the output folder as `finetune train` will claim it."""
    from finetune.train.engine import Engine
    from finetune.store.outputs import OutputDirError, claim_for_fresh_run
    from finetune.train.preflight import CheckReport, check

    try:
        engine = Engine(model, tokenizer, config)
    except ValueError as err:
        report = CheckReport()
        report.add("FAIL", "special tokens" if "token" in str(err) else "setup", str(err))
        return report
    report = check(engine, train, new_parameters, steps, eval)
    if not resume:
        try:
            replaced = claim_for_fresh_run(config.output_dir, config.overwrite_output_dir, dry_run=True)
            report.add("WARN" if replaced else "PASS", "output folder",
                       f"{config.output_dir}: " + (f"overwrite_output_dir replaces {', '.join(replaced)}" if replaced
                                                    else "free for a fresh run"))
        except OutputDirError as err:
            report.add("FAIL", "output folder", f"{err} (or check with --resume)")
    return report
