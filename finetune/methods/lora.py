"""LoRA (Hu et al., 2021): a frozen linear layer plus a trainable low-rank update.

    y = W x + (alpha / r) * B A dropout(x)         A: [r, in], B: [out, r]
    (rsLoRA, Kalajdzievski 2023: scale alpha / sqrt(r))

A is Kaiming-uniform (a = sqrt(5), nn.Linear's and PEFT's init), B is zero, so the model's output is
exactly unchanged at step 0 and A's gradient is zero until B moves. `merge()` folds (alpha/r) B A into W
and `unmerge()` takes it back out. Module and tensor names follow PEFT (`base_layer`, `lora_A`, `lora_B`)
so adapters convert to and from PEFT's format by a fixed key rule (finetune/methods/adapters.py: save and load).
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from finetune.checks import is_finite_number, is_integer
from finetune.families import family_of
from finetune.methods.freeze import freeze_all
from finetune.methods.lora_init import INITS, pissa
from finetune.methods.quant import is_quantized
from finetune.methods.surgery import replace_module
from finetune.patterns import compile_patterns

DEFAULT_R, DEFAULT_ALPHA, DEFAULT_DROPOUT = 16, 32.0, 0.05  # as people use LoRA (Hu et al., 2021; PEFT); written here only
# LoRA's settings: (the type, the range and the range in words): checked here only (`lora_problem`)
_LORA_RULES = {"r": (is_integer, lambda v: v >= 1, ">= 1"), "alpha": (is_finite_number, lambda v: v > 0, "> 0"),
               "dropout": (is_finite_number, lambda v: 0 <= v < 1, "in [0, 1)")}


def lora_problem(name: str, value) -> str | None:
    """What is wrong with a value of LoRA's `r`, `alpha` or `dropout`, or None: the one check of them, used by
    the layer, `apply_lora`, the methods' settings and the adapter files."""
    kind, ok, words = _LORA_RULES[name]
    if not kind(value):
        return f"must be {'an integer' if kind is is_integer else 'a finite number'} {words}"
    return None if ok(value) else f"must be {words}"


def check_lora_settings(where: str, **values) -> None:
    """ValueError naming the first of `values` (r, alpha, dropout) that `lora_problem` refuses."""
    for name, value in values.items():
        problem = lora_problem(name, value)
        if problem:
            raise ValueError(f"{where}: {name} {problem}, got {value!r}")


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """The scale of the update B A: alpha / r (rsLoRA: alpha / sqrt(r))."""
    return alpha / (math.sqrt(r) if rslora else r)


class Magnitude(nn.Module):
    """DoRA's trainable magnitude: one value per output row (PEFT's `lora_magnitude_vector`, whose only tensor is
    `.weight`, so the adapter keys match PEFT's by the same fixed rule as lora_A / lora_B)."""

    def __init__(self, norm: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(norm)


def float_weight(base: nn.Module) -> torch.Tensor:
    """The weight a (plain or quantised) linear layer computes with, as a float tensor (dequantised if need be)."""
    if is_quantized(base):
        return base.dequantized_weight()
    return base.weight


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  magnitude: torch.Tensor | None = None, norm: torch.Tensor | None = None) -> torch.Tensor:
    """The plain weight a LoRA layer computes with, in float32: W + s B A; with DoRA's magnitude m,
    m / ||W + s B A||_row * (W + s B A) (Liu et al., 2024; PEFT's merge). `norm`: that row norm, if known."""
    merged = weight.float() + scaling * (lora_B.float() @ lora_A.float())
    if magnitude is not None:
        norm = torch.linalg.norm(merged, dim=1) if norm is None else norm
        merged = (magnitude.float() / norm).view(-1, 1) * merged
    return merged


class LoRALinear(nn.Module):
    """A frozen linear layer (float, int8 or 4-bit) plus a trainable low-rank update; with `dora=True`, DoRA."""

    def __init__(self, base: nn.Module, r: int = DEFAULT_R, alpha: float = DEFAULT_ALPHA,
                 dropout: float = DEFAULT_DROPOUT, rslora: bool = False, dora: bool = False, init: str = "default"):
        super().__init__()
        check_lora_settings("LoRALinear", r=r, alpha=alpha, dropout=dropout)
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.rslora, self.dora = r, rslora, bool(dora)
        self.set_alpha(alpha)
        weight = base.weight
        # float32 adapters on a bf16 / fp16 (or quantised) base, as PEFT's autocast_adapter_dtype: an update of
        # B A in half precision would round the small steps of training away
        half = weight.dtype in (torch.float16, torch.bfloat16)
        float_dtype = weight.dtype if weight.dtype.is_floating_point and not half and not is_quantized(base) \
            else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=float_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=float_dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "gaussian":  # PEFT's init_lora_weights="gaussian"
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.pissa_initial = None  # (A0, B0) of a PiSSA start: the export against the original base needs them
        for p in base.parameters():
            p.requires_grad_(False)
        self.merged = False
        self._norm_cache = (None, None)  # (base weight version, ||W||^2 per row) - DoRA
        self._merged_norm = None
        if self.dora:
            with torch.no_grad():  # B = 0: the magnitude starts at the base's row norms, so the output is unchanged
                norm = torch.linalg.norm(float_weight(base).float(), dim=1)
            self.lora_magnitude_vector = Magnitude(norm.to(float_dtype))

    @torch.no_grad()
    def init_pissa(self) -> None:
        """PiSSA (finetune.methods.lora_init.pissa): A, B from W's principal singular vectors, the base weight
        becomes the residual; the output is unchanged."""
        if is_quantized(self.base_layer) or self.dora:
            raise TypeError("LoRALinear: PiSSA needs a float base and plain LoRA (not DoRA)")
        a, b, residual = pissa(self.base_layer.weight, self.r, self.scaling)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        self.base_layer.weight.copy_(residual)
        self.pissa_initial = (a.clone(), b.clone())

    def set_alpha(self, alpha: float) -> None:
        """alpha and the scale it gives (`lora_scaling`)."""
        self.alpha = alpha
        self.scaling = lora_scaling(alpha, self.r, self.rslora)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _base_sq_norm(self) -> torch.Tensor:
        """||W||^2 per output row of the frozen base, computed once and again only if the base weight changes
        (merge, a loaded state dict: the tensor's version counter says so)."""
        weight = self.base_layer.weight
        key = (weight.data_ptr(), weight._version, weight.device)
        if self._norm_cache[0] != key:
            with torch.no_grad():
                self._norm_cache = (key, float_weight(self.base_layer).float().pow(2).sum(dim=1))
        return self._norm_cache[1]

    def weight_norm(self) -> torch.Tensor:
        """DoRA's ||W + s B A|| per output row, in float32, without gradient (Liu et al., 2024, section 4.3: a
        constant in backward). Expanded as ||W||^2 + 2s <W, BA>_row + s^2 ||BA||^2_row, so the frozen base's own
        norm is computed once (`_base_sq_norm`) and no (out x in) matrix W + s B A is formed per step."""
        with torch.no_grad(), torch.autocast(self.lora_A.weight.device.type, enabled=False):
            a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
            w_at = float_weight(self.base_layer).float() @ a.t()  # (out, r) = W A^T
            cross = (b * w_at).sum(dim=1)
            ba_sq = ((b @ (a @ a.t())) * b).sum(dim=1)
            s = self.scaling
            return (self._base_sq_norm() + 2 * s * cross + s * s * ba_sq).clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        x = x.to(self.lora_A.weight.dtype)
        dropped = self.lora_dropout(x)
        update = self.lora_B(self.lora_A(dropped))
        if not self.dora:
            return out + (update * self.scaling).to(out.dtype)
        # DoRA as PEFT computes it: m / ||W + sBA|| * (W x + s B A x) + bias, the base output reused - unless
        # dropout is active, when the base term takes the dropped input, as the low-rank term does.
        scale = (self.lora_magnitude_vector.weight / self.weight_norm()).view(1, -1)
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # the base output reused: out + (scale - 1)(out - bias) + scale s BAx = scale (out - bias + s BAx) + bias,
            # in the output's dtype (bf16 under autocast: 4 passes over the output instead of 7 in float32)
            scale, update = scale.to(out.dtype), (update * self.scaling).to(out.dtype)
            if bias is None:
                return (out + update) * scale
            bias = bias.to(out.dtype)
            return (out - bias + update) * scale + bias
        if is_quantized(self.base_layer):
            base = self.base_layer(dropped)
            base = base if bias is None else base - bias
        else:
            base = nn.functional.linear(dropped, self.base_layer.weight)
        return out + ((scale - 1) * base + scale * update * self.scaling).to(out.dtype)

    def _base_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        if is_quantized(self.base_layer) or not weight.dtype.is_floating_point:
            raise TypeError(f"LoRALinear: cannot merge into a quantised base weight ({weight.dtype}); use "
                            "merge_lora(model), which dequantises the base first")
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self._base_weight()
        if self.dora:
            self._merged_norm = self.weight_norm()  # unmerge divides by the same norm of the unmerged weight
            weight.copy_(merged_weight(weight, self.lora_A.weight, self.lora_B.weight, self.scaling,
                                       self.lora_magnitude_vector.weight, self._merged_norm).to(weight.dtype))
        else:
            weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self._base_weight()
        if self.dora:
            factor = (self.lora_magnitude_vector.weight.float() / self._merged_norm).view(-1, 1)
            weight.copy_((weight.float() / factor - self.delta_weight().float()).to(weight.dtype))
            self._merged_norm = None
        else:
            weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    # ---- the layer's part in saving (finetune.store.export): the plain weight it computes with

    def plain_linear(self, state: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(weight, bias, bias added by BitFit) of the plain linear layer this one computes as, from `state` (a
        full state dict) at `prefix`: the base's, with W + sBA (DoRA: m / ||W + sBA|| (W + sBA)) unless merged."""
        base = self.base_layer
        if hasattr(base, "plain_linear"):
            weight, bias, added = base.plain_linear(state, prefix + "base_layer.")
        else:
            weight, bias, added = state[prefix + "base_layer.weight"], state.get(prefix + "base_layer.bias"), False
        if not self.merged:
            magnitude = state[prefix + "lora_magnitude_vector.weight"] if self.dora else None
            weight = merged_weight(weight, state[prefix + "lora_A.weight"], state[prefix + "lora_B.weight"],
                                   self.scaling, magnitude).to(weight.dtype)
        return weight, bias, added

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{', rslora' if self.rslora else ''}"
                f"{', DoRA' if self.dora else ''}, merged={self.merged}")


def default_targets(model: nn.Module) -> list[str]:
    """The family's query/value projections (finetune/families.py)."""
    family = family_of(model)
    if not family.lora_targets:
        raise ValueError(f"apply_lora: no default targets for model type {family.name!r}; pass targets=[regex]")
    return list(family.lora_targets)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers by module name: nn.Linear and the Int8Linear wrapper, not the parts inside wrappers."""
    inside = set()
    for module in model.modules():
        if isinstance(module, LoRALinear) or is_quantized(module):
            inside.update(id(m) for m in module.modules() if m is not module)
    return {name: m for name, m in model.named_modules()
            if name and id(m) not in inside and (isinstance(m, (nn.Linear, LoRALinear)) or is_quantized(m))}


def pattern_value(patterns: dict, name: str, default):
    r"""PEFT's rule for `rank_pattern` / `alpha_pattern`: the first key `k` (in order) with
    re.match(rf"(.*\.)?({k})$", name) gives the value; otherwise the default."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def lora_plan(model: nn.Module, targets=None, r: int = DEFAULT_R, alpha: float = DEFAULT_ALPHA,
              dropout: float = DEFAULT_DROPOUT, exclude=(),
              rank_pattern: dict | None = None, alpha_pattern: dict | None = None, dora: bool = False,
              also_train=(), modules_to_save=(), init: str = "default") -> tuple[list[str], list[str]]:
    """Check LoRA's settings against the model and say what `apply_lora` would wrap, changing nothing: (target
    patterns, names of the linear layers to wrap). A bad setting, or a target pattern that matches no linear
    layer, is an error naming it. Methods that quantise the base first (int8-lora, qlora) call this before they
    quantise, so a refused setting leaves the model as it was."""
    check_lora_settings("apply_lora", r=r, alpha=alpha, dropout=dropout)
    if not isinstance(dora, bool):
        raise ValueError(f"apply_lora: dora must be true or false, got {dora!r}")
    compile_patterns(list(rank_pattern or {}) + list(alpha_pattern or {}), "apply_lora rank_pattern/alpha_pattern")
    for key, value in (rank_pattern or {}).items():
        check_lora_settings(f"apply_lora: rank_pattern[{key!r}]", r=value)
    for key, value in (alpha_pattern or {}).items():
        check_lora_settings(f"apply_lora: alpha_pattern[{key!r}]", alpha=value)
    names_now = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    idle = [rx.pattern for rx in compile_patterns(also_train, "apply_lora also_train")
            if not any(rx.search(n) for n in names_now)]
    if idle:
        raise ValueError(f"apply_lora: also_train pattern(s) {idle} match no parameter name (names look like "
                         f"{names_now[:3]})")
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets) if targets else default_targets(model)
    regexes = compile_patterns(targets, "apply_lora targets")
    excluded = compile_patterns(exclude, "apply_lora exclude")
    layers = linear_layers(model)
    wrapped_already = [n for n, m in layers.items()
                       if isinstance(m, LoRALinear) and any(rx.search(n) for rx in regexes)]
    if wrapped_already:
        raise ValueError(f"apply_lora: {len(wrapped_already)} target layer(s) already have LoRA (e.g. "
                         f"{wrapped_already[0]}); apply LoRA once, or merge_lora(model) first")
    names = [n for n, m in layers.items() if not isinstance(m, LoRALinear) and not any(rx.search(n) for rx in excluded)
             and any(rx.search(n) for rx in regexes)]
    unmatched = [rx.pattern for rx in regexes if not any(rx.search(n) for n in names)]
    if unmatched:
        raise ValueError(f"apply_lora: target pattern(s) {unmatched} match no linear layer "
                         f"(linear layers look like {some_linear_names(model)})")
    _check_init(init, dora, [layers[n] for n in names])
    saved = modules_to_save_names(model, modules_to_save)
    inside = [(w, m) for w in names for m in saved if w == m or w.startswith(m + ".")]
    if inside:
        raise ValueError(f"apply_lora: modules_to_save module {inside[0][1]!r} holds the LoRA target {inside[0][0]!r}; "
                         "a module trains either in full or through an adapter: exclude its layers from the targets")
    return targets, names


def _check_init(init, dora: bool, layers) -> None:
    """`init` is one apply_lora can do here (finetune.methods.lora_init): LoftQ belongs to the quantising methods,
    PiSSA to float bases under plain LoRA."""
    if init not in INITS:
        raise ValueError(f"apply_lora: init must be one of {INITS}, got {init!r}")
    if init == "loftq":
        raise ValueError("apply_lora: init 'loftq' chooses the base's 4-bit / int8 codes with the adapter: use it "
                         "through the quantising methods (qlora, int8-lora: lora_init = 'loftq')")
    if init == "pissa" and (dora or any(is_quantized(m) or isinstance(m, LoRALinear) for m in layers)):
        raise ValueError("apply_lora: init 'pissa' replaces the base weight by its residual: it needs float base "
                         "layers and plain LoRA (not DoRA, not a quantised base: qlora / int8-lora take 'loftq')")


def apply_lora(model: nn.Module, targets=None, r: int = DEFAULT_R, alpha: float = DEFAULT_ALPHA,
               dropout: float = DEFAULT_DROPOUT,
               also_train=(), rslora: bool = False, exclude=(), rank_pattern: dict | None = None,
               alpha_pattern: dict | None = None, dora: bool = False, modules_to_save=(),
               init: str = "default") -> list[str]:
    """Wrap the linear layers whose module name matches a target regex; freeze everything else.

    `also_train` regexes name parameters that train in full beside the adapters (e.g. bert2bert's new
    cross-attention); `modules_to_save` names modules that train in full and are saved with the adapter (PEFT's
    setting and matching rule: `modules_to_save_names`); `exclude` regexes name modules never to wrap.
    `rank_pattern` / `alpha_pattern` give some layers another r / alpha (PEFT's keys and matching rule,
    `pattern_value`). `dora=True` adds DoRA's trainable magnitude per output row (Liu et al., 2024; PEFT's
    `use_dora`). `init`: how A and B start (finetune.methods.lora_init: default, gaussian, pissa). Bases may be
    float, int8 or 4-bit (finetune.methods.int8, finetune.methods.int4). Every setting is checked first
    (`lora_plan`: a target that matches no linear layer is an error naming it), so a refusal changes nothing. Returns the wrapped module names. The
    settings are kept on `model.lora_config` for `save_adapter`.
    """
    targets, wrapped = lora_plan(model, targets, r, alpha, dropout, exclude, rank_pattern, alpha_pattern, dora,
                                 also_train, modules_to_save, init)
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    for name in wrapped:
        module = model.get_submodule(name)
        replace_module(model, name, LoRALinear(module, r=pattern_value(rank_pattern, name, r),
                                               alpha=pattern_value(alpha_pattern, name, alpha), dropout=dropout,
                                               rslora=rslora, dora=dora, init=init))
        if init == "pissa":
            model.get_submodule(name).init_pissa()
    freeze_all(model)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.weight.requires_grad_(True)
            module.lora_B.weight.requires_grad_(True)
            if module.dora:
                module.lora_magnitude_vector.weight.requires_grad_(True)
    wrapped = sorted(wrapped)
    model.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "rslora": rslora, "dora": dora, "targets": targets,
                         "also_train": list(also_train), "modules": wrapped, "rank_pattern": rank_pattern,
                         "alpha_pattern": alpha_pattern, "modules_to_save": list(modules_to_save or ()), "init": init}
    for tensor in full_tensors(model).values():  # also_train and modules_to_save
        tensor.requires_grad_(True)
    keep_originals(model)
    return wrapped


def modules_to_save_names(model: nn.Module, entries, where: str = "apply_lora modules_to_save") -> list[str]:
    """The modules PEFT's `modules_to_save` entries name: every module whose name ends with an entry (PEFT's
    `_set_trainable`: str.endswith, so "layer_norm" also names "final_layer_norm"). An entry naming no module with
    parameters, or a module inside another one named, is an error naming it."""
    entries = [entries] if isinstance(entries, str) else list(entries or ())
    if not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"{where}: expected a list of module names, got {entries!r}")
    if not entries:
        return []
    modules = {n: m for n, m in model.named_modules() if n and any(True for _ in m.parameters())}
    found = {e: [n for n in modules if n.endswith(e)] for e in entries}
    idle = [e for e, names in found.items() if not names]
    if idle:
        raise ValueError(f"{where}: {idle} name no module with parameters (module names end like "
                         f"{sorted(modules)[:3]})")
    names = sorted({n for names in found.values() for n in names})
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"{where}: {nested[0][1]!r} lies inside {nested[0][0]!r}, both named: name one of them")
    return names


def full_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """The tensors a LoRA model trains in full beside its adapters and saves with them, by name: the `also_train`
    parameters and those of the `modules_to_save` modules - less a module's tensors tied to one outside it (an
    input embedding shared with the LM head: PEFT would train a copy; here they stay frozen and unsaved)."""
    config = getattr(model, "lora_config", None) or {}
    everything = list(model.named_parameters(remove_duplicate=False))
    regexes = compile_patterns(config.get("also_train", []), "also_train")
    chosen = {n: p for n, p in everything if any(rx.search(n) for rx in regexes)}
    for module in modules_to_save_names(model, config.get("modules_to_save", ())):
        chosen.update({n: p for n, p in everything
                       if n.startswith(module + ".") and not tied_elsewhere(everything, p, module)})
    once, seen = {}, set()
    for name, tensor in chosen.items():  # a tensor with two names (tied inside the module) once
        if id(tensor) not in seen:
            seen.add(id(tensor))
            once[name] = tensor
    return once


def tied_elsewhere(named: list, tensor: torch.Tensor, module: str) -> list[str]:
    """The names `tensor` has outside `module` among `named` (named_parameters(remove_duplicate=False)), less the
    aliases on the module's ancestors (BERT's LM head keeps its decoder's bias as `predictions.bias` too; the
    forward reads the decoder's): a tensor that also serves another part of the model, such as a shared embedding."""
    return [n for n, p in named if p is tensor and not n.startswith(module + ".")
            and not module.startswith(n.rsplit(".", 1)[0] + ".")]


def keep_originals(model: nn.Module) -> None:
    """Keep the values the full tensors had before training (`model.lora_originals`, once per tensor), so that
    switching to another adapter or disabling this one (finetune.methods.adapter_set) puts them back, as PEFT's
    modules_to_save keeps the original module beside its trained copy."""
    originals = getattr(model, "lora_originals", None) or {}
    for name, tensor in full_tensors(model).items():
        if name not in originals:
            originals[name] = tensor.detach().clone()
    model.lora_originals = originals


def some_linear_names(model, n=4):
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][:n]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain linear layers back: a model that
    `save_pretrained` writes and `from_pretrained` loads with the same outputs. Works in place."""
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        if is_quantized(base):  # an int8 / 4-bit base: dequantise to a float nn.Linear first
            base = base.dequantize()
            layer.base_layer = base
        layer.merge()
        replace_module(model, name, base)
    for attribute in ("lora_config", "lora_stash", "lora_originals", "lora_adapter_name"):  # other adapters too
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model
