"""Parameter groups, the optimizers of the pretraining recipes, and learning-rate schedules.

Optimizers (`TrainConfig.optimizer`; None: the family's, finetune/families.py), all well-kept implementations:

    adamw       torch's AdamW (fused kernel), the family's betas / eps; 8 bytes of state per trainable parameter
    adafactor   transformers' Adafactor at the T5 fine-tuning settings: no relative step, no parameter scaling,
                update clipping at RMS 1.0, no first moment (factored second moments: a row and a column per
                matrix). torch.optim.Adafactor always scales its step by min(lr, 1/sqrt(t)) and the parameter's
                RMS, so it cannot run the fixed learning rate of that recipe
    adamw8bit   bitsandbytes' AdamW8bit (block-wise 8-bit moments, CPU and CUDA): ~2 bytes per parameter

The decay rule (nanoGPT's `configure_optimizers`, and the BERT/RoBERTa recipe): every trainable
tensor of two or more dimensions decays; every 1-D tensor (biases, LayerNorm / RMSNorm gains) does not,
whatever the model calls its normalisation layers. `no_decay` regexes move more tensors (e.g.
embeddings) to the no-decay side. `lr_overrides` maps regexes to learning rates, for example a higher
rate for the newly initialised tensors of a warm-started bert2bert. Frozen tensors are in no group, so
the optimizer keeps no state for them. Tied tensors appear once.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from finetune.families import family_of
from finetune.patterns import compile_patterns

OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")


def optimizer_name(model: nn.Module, configured: str | None) -> str:
    """The optimizer a run uses: the configured one, else the family's recipe."""
    return configured or family_of(model).optimizer


# The learning rate and schedule each optimizer's recipe trains at when TrainConfig leaves them unset (None):
# AdamW at the fine-tuning rate of BERT / BART papers' small end with linear decay (the engine's default since
# its first release); Adafactor at T5's fine-tuning recipe, a constant 1e-3 without warm-up (Raffel et al., 2020,
# section 3.1.3).
RECIPES = {"adamw": (5e-5, "linear"), "adamw8bit": (5e-5, "linear"), "adafactor": (1e-3, "constant")}


@dataclass(frozen=True)
class Recipe:
    """What a run trains with: the optimizer, peak learning rate and schedule, and which of them TrainConfig left
    unset and the family's recipe gave (`taken`)."""
    optimizer: str
    lr: float
    schedule: str
    taken: tuple[str, ...]

    def describe(self) -> str:
        """E.g. "adafactor, lr 1e-3 constant (the family recipe)"; with only some taken, it names them."""
        text = f"{self.optimizer}, lr {short_number(self.lr)} {self.schedule}"
        if len(self.taken) == 3:
            return text + " (the family recipe)"
        return text + (f" ({' and '.join(self.taken)} from the family recipe)" if self.taken else "")


def short_number(value: float) -> str:
    """A learning rate as people write it: 1e-3, 2.5e-4, 0.05."""
    if value == 0 or abs(value) >= 0.01:
        return f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def training_recipe(model: nn.Module, optimizer: str | None, lr: float | None, schedule: str | None) -> Recipe:
    """The optimizer, lr and schedule a run uses: each set value wins; each unset one (None) is the family's
    recipe (finetune/families.py: T5 -> Adafactor, constant 1e-3; the others AdamW, 5e-5 linear). The lr and
    schedule follow the optimizer in use, so an explicit optimizer="adamw" on T5 gets AdamW's rate."""
    name = optimizer_name(model, optimizer)
    recipe_lr, recipe_schedule = RECIPES[name]
    taken = tuple(k for k, v in (("optimizer", optimizer), ("lr", lr), ("schedule", schedule)) if v is None)
    return Recipe(name, recipe_lr if lr is None else lr, recipe_schedule if schedule is None else schedule, taken)


def family_adam(model: nn.Module) -> tuple[tuple[float, float], float]:
    """(betas, eps) of the model family's pretraining recipe (the table and its sources: finetune/families.py)."""
    return family_of(model).adam


def param_groups(model: nn.Module, weight_decay: float, no_decay=(), lr_overrides=None, lr: float | None = None):
    """Optimizer groups of trainable tensors: decay / no-decay, split further by `lr_overrides` (first match
    wins) and by the model's own `lr_scales` (a method's {regex: factor}, e.g. LoRA+'s B at 16x A's rate: the
    factor multiplies the tensor's rate, overridden or `lr`).

    Each group is a dict with `params`, `names`, `weight_decay` and, where an override or scale applies, `lr`.
    A `no_decay` or `lr_overrides` pattern that matches no trainable tensor is an error naming it.
    """
    scales = [(re.compile(k), v) for k, v in getattr(model, "lr_scales", {}).items()]
    lr_overrides = dict(lr_overrides or {})
    no_decay_res = compile_patterns(no_decay, "no_decay")
    override_res = list(zip(compile_patterns(lr_overrides, "lr_overrides"), lr_overrides.values()))
    used = set()
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():  # each tensor once, under its first name
        if not param.requires_grad:
            continue
        decays = param.dim() >= 2
        for rx in no_decay_res:
            if rx.search(name):
                decays = False
                used.add(rx.pattern)
        group_lr = None  # the optimizer's lr, unless overridden or scaled
        for rx, value in override_res:
            if rx.search(name):
                group_lr = value
                used.add(rx.pattern)
                break
        for rx, factor in scales:
            if rx.search(name):
                if group_lr is None and lr is None:
                    raise ValueError(f"{name}: the model scales its learning rate ({rx.pattern}: x{factor}), so "
                                     "param_groups needs the base lr")
                group_lr = (lr if group_lr is None else group_lr) * factor
                break
        key = (decays, group_lr)
        group = groups.setdefault(key, {"params": [], "names": [], "weight_decay": weight_decay if decays else 0.0,
                                        "lr": group_lr})
        group["params"].append(param)
        group["names"].append(name)
    unused = [p for p in list(no_decay) + list(lr_overrides) if p not in used]
    if unused:
        raise ValueError(f"pattern(s) {unused} match no trainable parameter (check the names with "
                         "finetune.methods.freeze.trainable_report or model.named_parameters())")
    out = []
    for (_, group_lr), group in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1] or 0)):
        if group_lr is None:
            del group["lr"]
        out.append(group)
    return out


def describe_groups(groups, lr: float) -> str:
    """One line a group: its weight decay, peak learning rate and size (call before the optimizer owns them)."""
    lines = []
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(f"  weight_decay {g['weight_decay']:g}, lr {g.get('lr', lr):g}: {len(g['params'])} tensors, "
                     f"{n:,} parameters")
    return "optimizer groups:\n" + "\n".join(lines)


def build_adamw(model: nn.Module, groups, lr: float, betas=None, eps=None) -> torch.optim.AdamW:
    """AdamW with the family's betas/eps unless given; the fused kernel on CPU and CUDA (one pass over each
    tensor; HF Trainer's default too). On the real job (benchmarks/profile_real.py, MiniLM full fine-tuning,
    fp32) it trains at 124.6 samples/s against 107.7 with the single-tensor loop used before; the foreach form
    keeps a temporary per parameter (+128 MiB peak on a bart-base-sized model), so it is not used.
    """
    family_betas, family_eps = family_adam(model)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("no trainable parameters: everything is frozen, so the optimizer would train nothing")
    fusable = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    kwargs = {"fused": True} if fusable else {"foreach": False}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas or family_betas),
                             eps=family_eps if eps is None else eps, **kwargs)


def build_optimizer(name: str, model: nn.Module, groups, lr: float, betas=None, eps=None):
    """The optimizer `name` (OPTIMIZERS) over the parameter groups."""
    if name == "adamw":
        return build_adamw(model, groups, lr, betas, eps)
    if not [p for g in groups for p in g["params"]]:
        raise ValueError("no trainable parameters: everything is frozen, so the optimizer would train nothing")
    if name == "adafactor":
        from transformers.optimization import Adafactor

        if lr < 1e-4:
            warnings.warn(f"Adafactor at lr {lr:g}: without relative steps it moves at about lr per step, and T5's "
                          "recipe fine-tunes at a constant 1e-3 (Raffel et al., 2020); set lr=1e-3, "
                          "schedule='constant', or optimizer='adamw' for AdamW's small rates", stacklevel=3)
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         clip_threshold=1.0)
    if name == "adamw8bit":
        family_betas, family_eps = family_adam(model)
        return chunked_adamw8bit()(groups, lr=lr, betas=tuple(betas or family_betas),
                                   eps=family_eps if eps is None else eps)
    raise ValueError(f"optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


CHUNK = 1 << 20  # elements per 8-bit update on CPU: whole 256-element quantisation blocks


def chunked_adamw8bit():
    """bitsandbytes' AdamW8bit whose CPU update runs in chunks of CHUNK elements. bitsandbytes' CPU kernel
    dequantises a tensor's two moments, copies its gradient and forms the update in float32 all at once: five
    float32 copies of the largest tensor (a bart-base embedding: ~770 MB), more than the 8-bit state saves. Per
    chunk of whole quantisation blocks it computes the same numbers (a test pins chunked == whole)."""
    from finetune.methods.quant import bitsandbytes_module

    bnb = bitsandbytes_module("8-bit AdamW")

    class ChunkedAdamW8bit(bnb.optim.AdamW8bit):
        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            state = self.state[p]
            if p.device.type != "cpu" or state["state1"].dtype != torch.uint8 or p.numel() <= CHUNK:
                return super().update_step(group, p, gindex, pindex)
            p.data, p.grad = p.data.contiguous(), p.grad.contiguous()
            config = self.get_config(gindex, pindex, group)
            state["step"] += 1
            weights, grads = p.data.view(-1), p.grad.view(-1)
            moment1, moment2 = state["state1"].view(-1), state["state2"].view(-1)
            for start in range(0, p.numel(), CHUNK):
                part, blocks = slice(start, start + CHUNK), slice(start // 256, (start + CHUNK) // 256)
                bnb.functional.optimizer_update_8bit_blockwise(
                    self.optimizer_name, grads[part], weights[part], moment1[part], moment2[part],
                    config["betas"][0], config["betas"][1], 0.0, 0.0, config["eps"], state["step"], config["lr"],
                    state["qmap1"], state["qmap2"], state["absmax1"][blocks], state["absmax2"][blocks],
                    config["weight_decay"], gnorm_scale=1.0, skip_zeros=config["skip_zeros"])

    return ChunkedAdamW8bit


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's per-parameter state (its tensors; after the first step, when it exists)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v))


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "linear") -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Warm-up: step / warmup_steps (0 at step 0, 1 at the end of warm-up). Then linear: down to 0 at
    total_steps; cosine: half a cosine down to 0; constant: 1. Matches transformers'
    get_{linear,cosine,constant}_schedule_with_warmup (tests/train/test_optim.py).
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"schedule must be linear, cosine or constant, got {schedule!r}")


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, schedule: str = "linear"):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule)
    )


def flat_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict as safetensors tensors (`state.<i>.<key>`, nested keys joined by '/': bitsandbytes
    keeps its 8-bit quantisation state in a dict) and JSON (`param_groups`, the other per-parameter values)."""
    tensors, scalars, seen = {}, {}, set()

    def walk(index, key, value):
        if isinstance(value, dict):
            for inner, item in value.items():
                walk(index, f"{key}/{inner}", item)
        elif torch.is_tensor(value):  # a tensor shared between parameters (bitsandbytes' code tables) is copied
            shared = value.numel() and value.data_ptr() in seen
            seen.add(value.data_ptr())
            tensors[f"state.{index}.{key}"] = value.detach().clone() if shared else value.detach().contiguous()
        else:
            scalars[f"{index}.{key}"] = value

    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            walk(index, key, value)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def nested_optimizer_state(tensors: dict, meta: dict) -> dict:
    """The per-parameter state back from `flat_optimizer_state`'s tensors and JSON."""
    state: dict = {}

    def put(index, key, value):
        *outer, last = key.split("/")
        place = state.setdefault(int(index), {})
        for name in outer:
            place = place.setdefault(name, {})
        place[last] = value

    for key, value in tensors.items():
        put(*key.split(".", 2)[1:], value)
    for key, value in meta["scalars"].items():
        put(*key.split(".", 1), value)
    return state
