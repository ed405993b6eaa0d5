"""The fine-tuning methods by name: the model surgery done once, before the optimizer is built.

A method is a `Method`: its name, its settings (each declared once, as a `Setting` with its default, type and
check), the learning rate it trains pretrained tensors at, and `apply(model, new_tensors, settings)`. `METHODS`
lists the names in order; the CLI, run files (`[method]`), examples and benchmarks read the declarations, so
adding a method (IA3, say) is one `register(Method(...))` in this module, with its layer in its own module.

    full            every tensor trains
    frozen-encoder  the encoder is frozen (tied tensors with it, such as a shared embedding, too)
    bitfit          only biases (T5: zero-initialised added biases with add_missing_biases=True)
    lora            LoRA adapters on the family's default (or given) targets; the rest frozen
    int8-lora       int8 base weights (bitsandbytes) under LoRA adapters
    dora            LoRA with DoRA's trained magnitude per output row (Liu et al., 2024)
    lora-plus       LoRA+ (Hayou et al., 2024): LoRA whose B trains at 16x A's rate (setting lora_plus_ratio)
    rslora          rsLoRA (Kalajdzievski, 2023): LoRA scaled by alpha / sqrt(r) (setting lora_rslora)
    qlora           4-bit base weights (bitsandbytes NF4 or FP4, double quantisation) under LoRA adapters
    qlora-loftq     QLoRA with LoftQ's start: the codes and the adapters chosen together (setting lora_init)
    pissa           LoRA started from the principal singular vectors; the residual is the frozen base

`new_tensors` (a warm-started bert2bert's cross-attention and LM-head transform: the names its load report
gave as missing) always train in full: they start from random values, and no method may leave them random.
`new_tensor_lr` gives them their own learning rate.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from finetune.checks import is_finite_number, is_integer
from finetune.families import family_of
from finetune.methods import lora as lora_module
from finetune.methods.freeze import bitfit, freeze, unfreeze
from finetune.methods.lora_init import INITS


@dataclass(frozen=True)
class Setting:
    """One setting of a method: its name, default, type (for run files: int, float, bool, str, "regexes") and
    `check(value)`, which returns what is wrong with a value or None."""
    name: str
    default: Any
    kind: Any
    check: Callable[[Any], str | None] | None = None
    doc: str = ""

    def validate(self, value, where: str = "method", prefix: str = ""):
        """The value, checked (an int where a float is declared becomes a float); ValueError naming the setting
        (`prefix` goes before its name in a value's error, e.g. "[method] ")."""
        if self.kind in ("regexes", "names"):
            value = [value] if isinstance(value, str) else value
            ok = value is None or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
            value = list(value) if ok and value is not None else value
        elif self.kind is float:
            ok = is_finite_number(value)
            value = float(value) if ok else value
        elif self.kind is int:
            ok = is_integer(value)
        else:
            ok = isinstance(value, self.kind)
        if not ok:
            raise ValueError(f"{where}: key '{self.name}' has {type(value).__name__} {value!r}, expected "
                             f"{_KIND_NAMES.get(self.kind, self.kind)}")
        problem = self.check(value) if self.check else None
        if problem:
            raise ValueError(f"{where}: {prefix}{self.name} = {value!r}: {problem}")
        return value


_KIND_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
               "regexes": "a list of regex strings (or none)", "names": "a list of module names (or none)"}


def _positive(value):
    return None if value > 0 else "must be > 0"


def _one_of(*choices):
    return lambda value: None if value in choices else f"choose one of {', '.join(map(repr, choices))}"


LORA_SETTINGS = (
    Setting("lora_targets", None, "regexes", doc="module-name regexes of the linear layers to wrap (default: the "
            "family's query and value projections, finetune/families.py)"),
    Setting("lora_r", lora_module.DEFAULT_R, int, lambda v: lora_module.lora_problem("r", v), "adapter rank r"),
    Setting("lora_alpha", lora_module.DEFAULT_ALPHA, float, lambda v: lora_module.lora_problem("alpha", v),
            "scale numerator (scale = alpha / r)"),
    Setting("lora_dropout", lora_module.DEFAULT_DROPOUT, float, lambda v: lora_module.lora_problem("dropout", v),
            "dropout on the adapter's input"),
    Setting("lora_rslora", False, bool, doc="rsLoRA: scale alpha / sqrt(r) instead of alpha / r (Kalajdzievski, 2023)"),
    Setting("lora_plus_ratio", None, float, _positive, "LoRA+: B trains at this multiple of A's learning rate "
            "(Hayou et al., 2024: 16); none: the same rate"),
    Setting("lora_init", "default", str, _one_of(*INITS), "how A and B start: default (Kaiming A, zero B), gaussian, "
            "pissa (principal singular vectors; float bases), loftq (quantised bases: codes and adapter chosen "
            "together); finetune/methods/lora_init.py"),
    Setting("loftq_iter", 1, int, lambda v: None if v >= 1 else "must be >= 1", "LoftQ's alternating iterations"),
    Setting("modules_to_save", None, "names", doc="modules trained in full beside the adapters and saved with them "
            "(PEFT's modules_to_save: every module whose name ends with an entry, e.g. lm_head)"),
)
APPLIED = "finetune_method"  # the model attribute naming the method applied to it
ADAPTER_LR = 1e-3  # adapters and biases start from zero or train few tensors (benchmarks/results/spelling_recipes)
FULL_LR = 2e-4  # full fine-tuning of the main job: 2e-4 beat 1e-4 and 3e-4 (benchmarks/results/spelling_recipes)


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable  # (model, new_tensors: list[str], settings: dict) -> None
    settings: tuple[Setting, ...] = ()
    lr: float = FULL_LR  # the learning rate it trains the pretrained tensors at (the main job's default)
    doc: str = ""
    quantizer: tuple[Callable, str] | None = None  # quantised bases: ((settings) -> make(nn.Linear), its name)
    defaults: dict = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "defaults", {s.name: s.default for s in self.settings})

    def resolve(self, settings: dict | None = None, where: str | None = None, prefix: str = "") -> dict:
        """Every setting's value: the given ones checked, the rest their defaults (a given None means unset).
        A setting the method does not take is an error naming it."""
        where = where or "apply_method"
        given = {k: v for k, v in (settings or {}).items() if v is not None}
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise ValueError(f"{where}: method {self.name!r} takes no setting {', '.join(unknown)} (its settings: "
                             f"{', '.join(self.defaults) or 'none'})")
        by_name = {s.name: s for s in self.settings}
        return {**self.defaults, **{k: by_name[k].validate(v, where, prefix) for k, v in given.items()}}

    def __call__(self, model: nn.Module, new_tensors=(), **settings) -> nn.Module:
        applied = getattr(model, APPLIED, None)
        if applied is not None:
            raise ValueError(f"apply_method: this model has the method {applied!r} applied already; a second method "
                             f"({self.name!r}) would wrap its layers again. Apply one method to a freshly loaded model")
        resolved = self.resolve(settings)
        self.apply(model, list(new_tensors or ()), resolved)
        setattr(model, APPLIED, self.name)
        return model


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"method {name!r}: choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def exact_names_pattern(names) -> str | None:
    """One regex matching exactly these parameter names, with layer indices folded (`.3.` -> `.\\d+.`)."""
    if not names:
        return None
    stems = sorted({re.escape(re.sub(r"\.\d+\.", ".#.", n)).replace("\\#", "#").replace("#", r"\d+") for n in names})
    return "^(" + "|".join(stems) + ")$"


def new_tensor_lr(new_tensors, lr: float | None) -> dict[str, float]:
    """`lr_overrides` giving the newly initialised tensors their own learning rate (empty if none, or no rate).

    Warm-started models mix pretrained tensors with new ones: a rate that moves the new ones in minutes wrecks
    the pretrained ones, and the textbook rate barely moves the new ones (docs/guards.md)."""
    pattern = exact_names_pattern(new_tensors)
    return {pattern: lr} if pattern and lr else {}


def encoder_pattern(model: nn.Module) -> str:
    return family_of(model).encoder


def _new(new_tensors) -> list[str]:
    return [p for p in [exact_names_pattern(new_tensors)] if p]


def _lora_placement(new_tensors) -> dict:
    """Where adapters go around a warm-started model's new tensors: never on them (they train in full)."""
    new_modules = exact_names_pattern({n.rsplit(".", 1)[0] for n in new_tensors})
    return {"also_train": _new(new_tensors), "exclude": [new_modules] if new_modules else ()}


def _lora_args(s: dict) -> dict:
    return {"targets": s["lora_targets"], "r": s["lora_r"], "alpha": s["lora_alpha"], "dropout": s["lora_dropout"],
            "modules_to_save": s["modules_to_save"] or ()}


def with_defaults(settings: tuple[Setting, ...], **defaults) -> tuple[Setting, ...]:
    """The same settings with other defaults (a method that is another's with different settings)."""
    from dataclasses import replace

    return tuple(replace(s, default=defaults[s.name]) if s.name in defaults else s for s in settings)


def _frozen_encoder(model, new_tensors, s):
    freeze(model, [encoder_pattern(model)])
    if new_tensors:
        unfreeze(model, _new(new_tensors))


def _lora(model, new_tensors, s, dora: bool = False, init: str | None = None):
    if s["lora_init"] != "loftq" and s["loftq_iter"] != 1:
        raise ValueError(f"apply_method: loftq_iter = {s['loftq_iter']} is LoftQ's; lora_init is {s['lora_init']!r}")
    lora_module.apply_lora(model, dora=dora, rslora=s["lora_rslora"], init=init or s["lora_init"], **_lora_args(s),
                           **_lora_placement(new_tensors))
    if s["lora_plus_ratio"]:  # LoRA+: the optimizer's groups read the model's lr_scales (finetune.train.optim)
        model.lr_scales = {**getattr(model, "lr_scales", {}), r"\.lora_B\.weight$": s["lora_plus_ratio"]}


QUANTIZED_AT_LOAD = "finetune_quantized_at_load"  # set by finetune.models.streamed (`quantized_at_load`)


def _quantized_lora(make_linear: Callable, what: str) -> Callable:
    """Quantise the base (new tensors stay float: they train in full), then LoRA over it. The LoRA settings are
    checked against the model first, so a refused target leaves the model unquantised and a corrected retry
    works. A base quantised while it loaded (finetune.models.streamed) is checked against the settings instead."""
    def apply(model, new_tensors, s):
        from finetune.methods.quant import prepare_quantized_training, replace_linears

        init = s["lora_init"]
        if init == "pissa":
            raise ValueError(f"apply_method: lora_init 'pissa' replaces the base weight by its residual, which must stay "
                             f"float; {what}'s counterpart is lora_init = 'loftq'")
        _, names = lora_module.lora_plan(model, **_lora_args(s), **_lora_placement(new_tensors))
        at_load = getattr(model, QUANTIZED_AT_LOAD, None)
        if at_load is not None:
            _check_quantized_at_load(at_load, what, new_tensors, s)
            if init == "loftq":
                raise ValueError("apply_method: lora_init 'loftq' chooses the codes from the float weights, and this "
                                 "base was quantised while it loaded: load it in float (load_seq2seq), then apply")
        starts = _loftq_layers(model, names, make_linear(s), s) if init == "loftq" else {}
        if at_load is None:
            replace_linears(model, make_linear(s), float_modules(new_tensors, s), quantizer_label(what, s),
                            keep_float=not s["quantize_kept"], required=not starts)
        prepare_quantized_training(model)
        _lora(model, new_tensors, s, init="default" if init == "loftq" else None)
        _set_starts(model, starts)
    return apply


def _loftq_layers(model, names, make_linear: Callable, s: dict) -> dict:
    """Quantise the LoRA targets with LoftQ (finetune.methods.lora_init.loftq); their (A, B) by name."""
    from finetune.methods.lora_init import loftq
    from finetune.methods.surgery import replace_module

    scaling = lora_module.lora_scaling(s["lora_alpha"], s["lora_r"], s["lora_rslora"])
    starts = {}
    for name in names:
        a, b, quantised = loftq(model.get_submodule(name), s["lora_r"], scaling, make_linear, s["loftq_iter"])
        replace_module(model, name, quantised)
        starts[name] = (a, b)
    print(f"LoftQ: {len(starts)} layers quantised with their adapters' start ({s['loftq_iter']} iteration(s))",
          flush=True)
    return starts


def _set_starts(model, starts: dict) -> None:
    with torch.no_grad():
        for name, (a, b) in starts.items():
            layer = model.get_submodule(name)
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
    if starts:
        model.lora_config["init"] = "loftq"


def quantizer_label(what: str, s: dict) -> str:
    """How the quantisation report names itself: "quantize_4bit (nf4)", "quantize_int8"."""
    return f"{what} ({s['quant_type']})" if "quant_type" in s else what


def quantization_settings(s: dict) -> dict:
    """The settings of a quantised method that decide its codes (all but LoRA's)."""
    return {k: v for k, v in s.items() if not k.startswith("lora_") and k not in ("modules_to_save", "loftq_iter")}


def float_modules(new_tensors, s: dict) -> list[str]:
    """Regexes of what a quantised base keeps float because it trains in full: the new tensors and the modules
    `modules_to_save` names (and everything inside them)."""
    return _new(new_tensors) + [re.escape(e) + r"(\..*)?$" for e in s.get("modules_to_save") or ()]


def quantized_at_load(what: str, new_tensors, s: dict) -> dict:
    """What a base quantised while it loaded records (the model attribute QUANTIZED_AT_LOAD)."""
    return {"quantizer": what, "settings": quantization_settings(s), "skip": float_modules(new_tensors, s)}


def _check_quantized_at_load(at_load: dict, what: str, new_tensors, s: dict) -> None:
    wanted = quantized_at_load(what, new_tensors, s)
    if at_load != wanted:
        raise ValueError(f"apply_method: this model's base was quantised while it loaded as {at_load}, not as this "
                         f"method asks ({wanted}); load it with the same method, settings and new tensors")


def _int8_linear(s: dict) -> Callable:
    from finetune.methods.int8 import Int8Linear

    return lambda linear: Int8Linear(linear, threshold=s["int8_threshold"])


def _int4_linear(s: dict) -> Callable:
    from finetune.methods.int4 import Int4Linear

    return lambda linear: Int4Linear(linear, s["quant_type"], s["double_quant"])


QUANTIZE_KEPT = Setting("quantize_kept", False, bool, doc="also quantise the layers the model's class keeps in float "
                        "when transformers quantises it (T5's feed-forward output `wo`: 2.0B of Flan-T5-XXL's 11.1B "
                        "parameters)")


register(Method("full", lambda model, new_tensors, s: None, doc="every tensor trains"))
register(Method("frozen-encoder", _frozen_encoder, doc="the encoder is frozen (and tensors tied with it)"))
register(Method("bitfit", lambda model, new_tensors, s: bitfit(
    model, also=_new(new_tensors), add_missing_biases=s["add_missing_biases"]),
    (Setting("add_missing_biases", False, bool, doc="T5 and other bias-free models: add zero-initialised biases"),),
    lr=ADAPTER_LR, doc="only biases train"))
register(Method("lora", _lora, LORA_SETTINGS, lr=ADAPTER_LR, doc="LoRA adapters; the rest frozen"))
register(Method("int8-lora", _quantized_lora(_int8_linear, "quantize_int8"), LORA_SETTINGS + (
    Setting("int8_threshold", 6.0, float, lambda v: None if v >= 0 else "must be >= 0",
            "LLM.int8() outlier threshold (CUDA)"), QUANTIZE_KEPT), lr=ADAPTER_LR, doc="int8 base weights under LoRA",
    quantizer=(_int8_linear, "quantize_int8")))
register(Method("dora", lambda model, new_tensors, s: _lora(model, new_tensors, s, dora=True), LORA_SETTINGS,
                lr=ADAPTER_LR, doc="LoRA with DoRA's trained magnitude per output row"))
register(Method("lora-plus", _lora, with_defaults(LORA_SETTINGS, lora_plus_ratio=16.0), lr=FULL_LR,
                doc="LoRA+: B at 16x A's learning rate (A at full fine-tuning's rate)"))
register(Method("rslora", _lora, with_defaults(LORA_SETTINGS, lora_rslora=True), lr=ADAPTER_LR,
                doc="rsLoRA: LoRA scaled by alpha / sqrt(r)"))
QLORA_SETTINGS = LORA_SETTINGS + (Setting("quant_type", "nf4", str, _one_of("nf4", "fp4"), "4-bit code book"),
                                  Setting("double_quant", True, bool, doc="quantise the block scales too"),
                                  QUANTIZE_KEPT)
register(Method("qlora", _quantized_lora(_int4_linear, "quantize_4bit"), QLORA_SETTINGS, lr=ADAPTER_LR,
                doc="4-bit base weights (NF4 / FP4) under LoRA", quantizer=(_int4_linear, "quantize_4bit")))
register(Method("qlora-loftq", _quantized_lora(_int4_linear, "quantize_4bit"),
                with_defaults(QLORA_SETTINGS, lora_init="loftq"), lr=ADAPTER_LR,
                doc="QLoRA whose 4-bit codes and adapters start together (LoftQ, Li et al., 2023)",
                quantizer=(_int4_linear, "quantize_4bit")))
register(Method("pissa", _lora, with_defaults(LORA_SETTINGS, lora_init="pissa"), lr=ADAPTER_LR,
                doc="LoRA from the principal singular vectors, the residual as the frozen base (Meng et al., 2024)"))

METHODS = tuple(REGISTRY)


def settings_of(name: str) -> dict:
    """The settings a method takes, with their defaults."""
    return dict(method(name).defaults)


def apply_method(model: nn.Module, name: str, new_tensors=(), **settings) -> nn.Module:
    """Apply a registered method; a setting the method does not take, or a bad value, is an error naming it
    (None means not set). Returns the model."""
    return method(name)(model, new_tensors, **settings)
