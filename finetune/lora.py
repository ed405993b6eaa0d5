"""LoRA (Hu et al., 2021): a frozen linear layer plus a trainable low-rank update.

    y = W x + (alpha / r) * B A dropout(x)         A: [r, in], B: [out, r]
    (rsLoRA, Kalajdzievski 2023: scale alpha / sqrt(r))

A is Kaiming-uniform (a = sqrt(5), nn.Linear's and PEFT's init), B is zero, so the model's output is
exactly unchanged at step 0 and A's gradient is zero until B moves. `merge()` folds (alpha/r) B A into W
and `unmerge()` takes it back out. Module and tensor names follow PEFT (`base_layer`, `lora_A`, `lora_B`)
so adapters convert to and from PEFT's format by a fixed key rule.
"""
from __future__ import annotations

import json
import math
import os
import re

import torch
from torch import nn

from .freeze import freeze_all, unfreeze
from .patterns import compile_patterns

FAMILY_TARGETS = {
    "bart": [r"\.(q_proj|v_proj)$"], "mbart": [r"\.(q_proj|v_proj)$"], "marian": [r"\.(q_proj|v_proj)$"],
    "pegasus": [r"\.(q_proj|v_proj)$"],
    "t5": [r"\.(q|v)$"], "mt5": [r"\.(q|v)$"], "umt5": [r"\.(q|v)$"],
    "bert": [r"\.(query|value)$"], "encoder-decoder": [r"\.(query|value)$"],
}
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05, rslora: bool = False):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRALinear: r must be >= 1, got {r}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        weight = base.weight
        float_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=float_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=float_dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        for p in base.parameters():
            p.requires_grad_(False)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    def _base_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        if not weight.dtype.is_floating_point:
            raise TypeError(f"LoRALinear: cannot merge into a {weight.dtype} base weight (an int8 base); use "
                            "merge_lora(model), which dequantises the base first")
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self._base_weight()
        weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self._base_weight()
        weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{', rslora' if self.rslora else ''}, "
                f"merged={self.merged}")


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type not in FAMILY_TARGETS:
        raise ValueError(f"apply_lora: no default targets for model type {model_type!r}; pass targets=[regex]")
    return FAMILY_TARGETS[model_type]


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers by module name: nn.Linear and the Int8Linear wrapper, not the parts inside wrappers."""
    inside = set()
    for module in model.modules():
        if isinstance(module, LoRALinear) or is_int8(module):
            inside.update(id(m) for m in module.modules() if m is not module)
    return {name: m for name, m in model.named_modules()
            if name and id(m) not in inside and (isinstance(m, (nn.Linear, LoRALinear)) or is_int8(m))}


def is_int8(module: nn.Module) -> bool:
    """An Int8Linear (finetune.int8), recognised without importing bitsandbytes."""
    return getattr(type(module), "is_int8_linear", False)


def apply_lora(model: nn.Module, targets=None, r: int = 16, alpha: float = 32, dropout: float = 0.05,
               also_train=(), rslora: bool = False, exclude=()) -> list[str]:
    """Wrap the linear layers whose module name matches a target regex; freeze everything else.

    `also_train` regexes name parameters that train in full beside the adapters (e.g. bert2bert's new
    cross-attention); `exclude` regexes name modules never to wrap. A target that matches no linear layer
    is an error naming it. Returns the wrapped module names. The settings are kept on `model.lora_config`
    for `save_adapter`.
    """
    targets = list(targets) if targets else default_targets(model)
    regexes = compile_patterns(targets, "apply_lora targets")
    excluded = compile_patterns(exclude, "apply_lora exclude")
    hits = {rx.pattern: [] for rx in regexes}
    for name, module in _linear_layers(model).items():
        if isinstance(module, LoRALinear) or any(rx.search(name) for rx in excluded):
            continue
        matched = [rx for rx in regexes if rx.search(name)]
        if not matched:
            continue
        for rx in matched:
            hits[rx.pattern].append(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, r=r, alpha=alpha, dropout=dropout, rslora=rslora))
    unmatched = [p for p, names in hits.items() if not names]
    if unmatched:
        raise ValueError(f"apply_lora: target pattern(s) {unmatched} match no linear layer "
                         f"(linear layers look like {_some_linear_names(model)})")
    freeze_all(model)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.weight.requires_grad_(True)
            module.lora_B.weight.requires_grad_(True)
    if also_train:
        unfreeze(model, also_train)
    wrapped = sorted({n for names in hits.values() for n in names})
    model.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "rslora": rslora, "targets": targets,
                         "also_train": list(also_train), "modules": wrapped}
    return wrapped


def _some_linear_names(model, n=4):
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][:n]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _also_train_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    patterns = getattr(model, "lora_config", {}).get("also_train", [])
    regexes = compile_patterns(patterns, "also_train") if patterns else []
    return {n: p for n, p in model.named_parameters() if any(rx.search(n) for rx in regexes)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA A/B weights and the also_train tensors, under their names in the model."""
    state = {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    state.update(_also_train_tensors(model))
    return {n: t.detach().contiguous() for n, t in state.items()}


def save_adapter(model: nn.Module, directory: str, format: str = "finetune", base_model: str | None = None) -> str:
    """Write only the adapter: safetensors + a small JSON config. format='peft' writes PEFT's files and keys."""
    from safetensors.torch import save_file

    config = getattr(model, "lora_config", None)
    if config is None or not lora_layers(model):
        raise ValueError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    if any(m.merged for m in lora_layers(model).values()):
        raise ValueError("save_adapter: the LoRA layers are merged; unmerge() them first")
    os.makedirs(directory, exist_ok=True)
    state = adapter_state_dict(model)
    base_model = base_model or getattr(model.config, "_name_or_path", None) or None
    if format == "finetune":
        save_file(state, os.path.join(directory, ADAPTER_WEIGHTS))
        meta = {"format": "finetune-lora", **config, "base_model": base_model}
    elif format == "peft":
        peft_state = {}
        for name, tensor in state.items():
            if ".lora_A." in name or ".lora_B." in name:
                peft_state[PEFT_PREFIX + name] = tensor
            else:
                raise ValueError(f"save_adapter(format='peft'): also_train tensor {name} has no PEFT key in this "
                                 "exporter; save with format='finetune' or drop also_train")
        save_file(peft_state, os.path.join(directory, PEFT_WEIGHTS))
        meta = {
            "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": config["r"], "lora_alpha": config["alpha"],
            "lora_dropout": config["dropout"], "use_rslora": config["rslora"], "bias": "none",
            "target_modules": config["modules"], "fan_in_fan_out": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": base_model,
        }
    else:
        raise ValueError(f"save_adapter: format must be 'finetune' or 'peft', got {format!r}")
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return directory


def load_adapter(model: nn.Module, directory: str) -> list[str]:
    """Load an adapter folder (ours or PEFT's) into `model`, applying LoRA first if it has none yet."""
    from safetensors.torch import load_file

    config_path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: no adapter config (is this an adapter folder?)")
    with open(config_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("peft_type") == "LORA":
        weights = os.path.join(directory, PEFT_WEIGHTS)
        state = {_from_peft_key(k): v for k, v in load_file(weights).items()}
        settings = dict(r=meta["r"], alpha=meta["lora_alpha"], dropout=meta.get("lora_dropout", 0.0),
                        rslora=meta.get("use_rslora", False), also_train=())
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    elif meta.get("format") == "finetune-lora":
        weights = os.path.join(directory, ADAPTER_WEIGHTS)
        state = load_file(weights)
        settings = dict(r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"], rslora=meta["rslora"],
                        also_train=meta.get("also_train", []))
        modules = meta["modules"]
    else:
        raise ValueError(f"{config_path}: neither a finetune nor a PEFT LoRA adapter config")
    existing = lora_layers(model)
    if not existing:
        apply_lora(model, targets=["^" + re.escape(m) + "$" for m in modules], **settings)
    elif sorted(existing) != sorted(modules):
        raise ValueError(f"{directory}: adapter wraps {len(modules)} modules that differ from the model's LoRA layers")
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise ValueError(f"{weights}: tensors {missing[:3]} have no place in this model (a different base model?)")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{weights}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
    return sorted(state)


def _from_peft_key(key: str) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"unexpected PEFT adapter key {key!r} (expected the prefix {PEFT_PREFIX!r})")
    key = key[len(PEFT_PREFIX):]
    return re.sub(r"\.lora_([AB])(\.[^.]+)?\.weight$", r".lora_\1.weight", key)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain linear layers back: a model that
    `save_pretrained` writes and `from_pretrained` loads with the same outputs. Works in place."""
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        if is_int8(base):  # an int8 base: dequantise to a float nn.Linear first
            base = base.dequantize()
            layer.base_layer = base
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
