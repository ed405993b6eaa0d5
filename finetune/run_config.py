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

import sys
import typing
from dataclasses import dataclass, field

from finetune.checks import check_table, fits, unknown_keys
from finetune.train.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dependency on those versions)
    import tomli as tomllib

from finetune.data.noise import NoiseConfig
from finetune.methods.registry import METHODS, REGISTRY, method


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
        unknown_keys(settings, any_method | {"name", "freeze", "unfreeze"}, where)
        for key in settings:
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
    if cls is NoiseConfig and not isinstance(values.get("protect", ""), str):
        raise ValueError(f"{where}: key 'protect' must be a rule name such as \"last_word\"")
    hints = typing.get_type_hints(cls)
    check_table({k: v for k, v in values.items() if not (cls is NoiseConfig and k == "protect")}, hints, where)
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
