"""LoRA adapters on disk: save and load in our format and in PEFT's, converted by a fixed key rule.

    ours   adapter.safetensors (the LoRA A/B weights under their names in the model, plus `also_train`
           tensors) + adapter_config.json {"format": "finetune-lora", r, alpha, dropout, rslora, modules, ...}
    PEFT   adapter_model.safetensors (keys `base_model.model.<module>.lora_A.weight`) + adapter_config.json
           {"peft_type": "LORA", r, lora_alpha, target_modules, rank_pattern, alpha_pattern, ...}

`load_adapter` reads and checks everything before it touches the model, so a bad adapter leaves it as it was.
"""
from __future__ import annotations

import functools
import json
import os
import re

import torch
from torch import nn

from finetune.methods.adapter_set import active_adapter, check_new_name, stash_for_loading
from finetune.methods.lora import (apply_lora, check_lora_settings, full_tensors, keep_originals, linear_layers,
                                   lora_layers, modules_to_save_names, pattern_value, some_linear_names, tied_elsewhere)
from finetune.methods.lora_init import converted_for_the_original_base
from finetune.methods.surgery import replace_module
from finetune.patterns import compile_patterns
from finetune.store.export import BESIDE_MODEL

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

_REQUIRED = object()  # an adapter config's key without a default


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA A/B weights (and DoRA magnitudes) and the tensors trained in full beside them (`also_train`,
    `modules_to_save`: finetune.methods.lora.full_tensors), under their names in the model."""
    state = {n: p for n, p in model.named_parameters() if is_lora_key(n)}
    state.update(full_tensors(model))
    return {n: t.detach().contiguous() for n, t in state.items()}


def peft_modules_to_save(model: nn.Module, names) -> list[str]:
    """The module names PEFT's `modules_to_save` needs for these full tensors: the largest modules all of whose
    tensors are among them, and for a tensor left over (a bias whose weight is frozen), the module holding it (the
    adapter then carries only that tensor: PEFT's copy keeps the base's others). Each name is checked against
    PEFT's matching rule (str.endswith over every module name), so PEFT wraps exactly these modules."""
    everything, names = list(model.named_parameters(remove_duplicate=False)), set(names)
    wanted = {id(p) for n, p in everything if n in names}
    chosen = []
    for module_name, module in model.named_modules():
        if not module_name or any(module_name.startswith(c + ".") for c in chosen):
            continue
        tensors = list(module.parameters())
        if tensors and all(id(p) in wanted and not tied_elsewhere(everything, p, module_name) for p in tensors):
            chosen.append(module_name)
    covered = {id(p) for n, p in everything if any(n.startswith(c + ".") for c in chosen)}
    for name, tensor in everything:  # the shortest-owned alias of each tensor left over
        if id(tensor) in wanted and id(tensor) not in covered:
            owners = [n.rsplit(".", 1)[0] for n, p in everything if p is tensor]
            owner = min(owners, key=lambda o: sum(1 for _ in model.get_submodule(o).parameters()))
            tied = tied_elsewhere(everything, tensor, owner)
            if tied:
                raise ValueError(f"save_adapter(format='peft'): {name} is tied to {tied[0]}; PEFT's modules_to_save "
                                 "would train a copy of one of them")
            chosen.append(owner)
            covered.add(id(tensor))
    modules = [n for n, _ in model.named_modules() if n]
    for name in chosen:
        extra = [n for n in modules if n.endswith(name) and n != name]
        if extra:
            raise ValueError(f"save_adapter(format='peft'): PEFT's modules_to_save {name!r} would also wrap {extra[0]!r}")
    return sorted(set(chosen))


def save_adapter(model: nn.Module, directory: str, format: str = "finetune", base_model: str | None = None) -> str:
    """Write only the adapter: safetensors + a small JSON config. format='peft' writes PEFT's files and keys."""
    from safetensors.torch import save_file

    config = getattr(model, "lora_config", None)
    if config is None or not lora_layers(model):
        raise ValueError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    if any(m.merged for m in lora_layers(model).values()):
        raise ValueError("save_adapter: the LoRA layers are merged; unmerge() them first")
    os.makedirs(directory, exist_ok=True)
    state, config = _against_the_original_base(model, adapter_state_dict(model), config)
    base_model = base_model or getattr(model.config, "_name_or_path", None) or None
    if format == "finetune":
        save_file(state, os.path.join(directory, ADAPTER_WEIGHTS))
        meta = {"format": "finetune-lora", **config, "base_model": base_model}
    elif format == "peft":
        full = [n for n in state if not is_lora_key(n)]
        saved_modules = peft_modules_to_save(model, full) if full else None
        peft_state = {_to_peft_key(n): t for n, t in state.items() if is_lora_key(n)}
        for module in saved_modules or ():  # PEFT loads a module to save whole: its frozen tensors too
            peft_state.update({_to_peft_key(f"{module}.{n}"): t.detach().contiguous()
                               for n, t in model.get_submodule(module).state_dict(keep_vars=True).items()})
        save_file(peft_state, os.path.join(directory, PEFT_WEIGHTS))
        meta = {
            "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": config["r"], "lora_alpha": config["alpha"],
            "lora_dropout": config["dropout"], "use_rslora": config["rslora"], "bias": "none",
            "use_dora": bool(config.get("dora", False)),
            "target_modules": config["modules"], "fan_in_fan_out": False, "init_lora_weights": True,
            "rank_pattern": config.get("rank_pattern", {}), "alpha_pattern": config.get("alpha_pattern", {}),
            "inference_mode": True, "modules_to_save": saved_modules, "base_model_name_or_path": base_model,
        }
    else:
        raise ValueError(f"save_adapter: format must be 'finetune' or 'peft', got {format!r}")
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return directory


def _against_the_original_base(model: nn.Module, state: dict, config: dict) -> tuple[dict, dict]:
    """A PiSSA adapter (whose model computes with the residual base) as one for the original base, rank 2r and
    alpha doubled (finetune.methods.lora_init: PEFT's conversion); any other adapter as it is."""
    layers = {n: m for n, m in lora_layers(model).items() if m.pissa_initial is not None}
    if not layers:
        return state, config
    state = dict(state)
    for name, layer in layers.items():
        a0, b0 = layer.pissa_initial
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = converted_for_the_original_base(
            state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"], a0, b0)
    factor = 2 ** 0.5 if config["rslora"] else 2  # alpha / r (rsLoRA: alpha / sqrt r) stays as it was
    config = {**config, "r": 2 * config["r"], "alpha": factor * config["alpha"], "init": "default",
              "converted_from": "pissa (saved against the original base weights: rank 2r)",
              "rank_pattern": {k: 2 * v for k, v in config["rank_pattern"].items()},
              "alpha_pattern": {k: factor * v for k, v in config["alpha_pattern"].items()}}
    return state, config


def load_adapter(model: nn.Module, directory: str, adapter_name: str | None = None) -> list[str]:
    """Load an adapter folder (ours or PEFT's) into `model`, applying LoRA first if it has none yet.

    With `adapter_name`, into a model that has an adapter already, it is loaded beside it under that name and the
    active adapter stays active (PEFT's `load_adapter(path, adapter_name)`; finetune.methods.adapter_set switches);
    into a model without one, it becomes the active adapter of that name. Without a name, into a model with LoRA
    layers, its tensors replace the active adapter's (same modules only).

    Everything is read and checked before the model is touched - the config (required keys and their
    types), the weights (every tensor has a place, of the right shape), the settings PEFT can express and this
    layer cannot (refused, never ignored) - so a bad adapter leaves the model exactly as it was. Loaded into a
    model that already has LoRA layers on the same modules, the adapter's alpha (scaling) replaces theirs.
    """
    if adapter_name is not None and active_adapter(model) is not None:
        with stash_for_loading(model, adapter_name):
            return _load_into(model, directory)
    if adapter_name is not None:
        check_new_name(model, adapter_name, "load_adapter")
    loaded = _load_into(model, directory)
    if adapter_name is not None:
        model.lora_adapter_name = adapter_name
    return loaded


def _load_into(model: nn.Module, directory: str) -> list[str]:
    settings, modules, state, weights = _read_adapter(os.fspath(directory))
    existing = lora_layers(model)
    if existing and sorted(existing) != sorted(modules):
        raise ValueError(f"{directory}: the adapter wraps {len(modules)} modules (e.g. {modules[:2]}) and the model's "
                         f"LoRA layers are {len(existing)} others (e.g. {sorted(existing)[:2]}); load it into a model "
                         "without LoRA layers")
    if any(m.merged for m in existing.values()):
        raise ValueError(f"{directory}: the model's LoRA layers are merged; unmerge() them before loading an adapter")
    mismatched = [n for n, layer in existing.items() if layer.dora != settings["dora"]]
    if mismatched:
        raise ValueError(f"{directory}: the adapter is {'DoRA' if settings['dora'] else 'plain LoRA'} and the model's "
                         f"LoRA layers are not (e.g. {mismatched[0]}); load it into a model without LoRA layers")
    state = _without_base_copies(model, settings, state)
    _check_adapter_fits(model, directory, weights, settings, modules, state, existing)
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    had_config, had_originals = getattr(model, "lora_config", None), getattr(model, "lora_originals", None)
    try:
        if not existing:
            apply_lora(model, targets=["^" + re.escape(m) + "$" for m in modules], **settings)
        else:
            for name, layer in existing.items():
                layer.rslora = settings["rslora"]
                layer.set_alpha(pattern_value(settings["alpha_pattern"], name, settings["alpha"]))
            model.lora_config = {**(had_config or {}), "r": settings["r"], "alpha": settings["alpha"],
                                 "rslora": settings["rslora"], "rank_pattern": settings["rank_pattern"],
                                 "alpha_pattern": settings["alpha_pattern"], "modules": sorted(modules)}
        params = dict(model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        keep_originals(model)
    except Exception:
        if not existing:  # put the plain layers back
            for name, layer in lora_layers(model).items():
                replace_module(model, name, layer.base_layer)
            model.lora_originals = had_originals
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), p.requires_grad))
        if had_config is None and hasattr(model, "lora_config"):
            del model.lora_config
        elif had_config is not None:
            model.lora_config = had_config
        raise
    return sorted(state)


def _read_adapter(directory: str):
    """(settings for apply_lora, module names, tensors by model name, weights path) of an adapter folder."""
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    meta = _read_config(directory, config_path)
    need = functools.partial(_need, meta, config_path)
    if meta.get("peft_type") is not None:
        settings, modules, state, weights = _read_peft(directory, config_path, meta, need)
    elif meta.get("format") == "finetune-lora":
        weights = os.path.join(directory, ADAPTER_WEIGHTS)
        settings = dict(r=need("r", int), alpha=need("alpha", _NUMBER), dropout=need("dropout", _NUMBER, 0.0),
                        rslora=need("rslora", bool, False), dora=need("dora", bool, False),
                        also_train=need("also_train", list, []),
                        modules_to_save=need("modules_to_save", list, []) or [],
                        rank_pattern=need("rank_pattern", dict, {}) or {},
                        alpha_pattern=need("alpha_pattern", dict, {}) or {})
        modules = need("modules", list)
        if not all(isinstance(m, str) for m in modules):
            raise ValueError(f"{config_path}: 'modules' must be a list of module names")
        state = _load_weights(weights)
    else:
        raise ValueError(f"{config_path}: neither a finetune nor a PEFT LoRA adapter config (no 'peft_type' or "
                         "'format' key)")
    check_lora_settings(config_path, r=settings["r"], alpha=settings["alpha"], dropout=settings["dropout"])
    if not modules:
        raise ValueError(f"{weights}: holds no LoRA tensors")
    return settings, modules, state, weights


def _read_config(directory: str, config_path: str) -> dict:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such adapter folder")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: no adapter config (is this an adapter folder?)")
    try:
        with open(config_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _need(meta: dict, config_path: str, key: str, kind, default=_REQUIRED):
    """meta[key], of type `kind` (a bool is no number), or `default` when absent; a required key must be there."""
    value = meta.get(key, default)
    if value is _REQUIRED:
        raise ValueError(f"{config_path}: required key '{key}' is missing")
    if value is not None and (isinstance(value, bool) and kind is not bool or not isinstance(value, kind)):
        raise ValueError(f"{config_path}: '{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _read_peft(directory: str, config_path: str, meta: dict, need):
    """A PEFT LoRA adapter: its settings (refusing the PEFT options this layer does not implement) and tensors."""
    if meta["peft_type"] != "LORA":
        raise ValueError(f"{config_path}: peft_type {meta['peft_type']!r}: only LoRA adapters are supported")
    unsupported = {"bias": meta.get("bias", "none") != "none",
                   "layers_to_transform": meta.get("layers_to_transform") is not None,
                   "fan_in_fan_out": bool(meta.get("fan_in_fan_out")),
                   "lora_bias": bool(meta.get("lora_bias"))}
    refused = [k for k, on in unsupported.items() if on]
    if refused:
        raise ValueError(f"{config_path}: this adapter uses PEFT settings this LoRA layer does not implement "
                         f"({', '.join(f'{k}={meta.get(k)!r}' for k in refused)}); loading it would change the "
                         "model differently than PEFT does")
    weights = os.path.join(directory, PEFT_WEIGHTS)
    settings = dict(r=need("r", int), alpha=need("lora_alpha", _NUMBER), dropout=need("lora_dropout", _NUMBER, 0.0),
                    rslora=need("use_rslora", bool, False), dora=need("use_dora", bool, False) or False,
                    also_train=(), modules_to_save=need("modules_to_save", list, []) or [],
                    rank_pattern=need("rank_pattern", dict, {}) or {},
                    alpha_pattern=need("alpha_pattern", dict, {}) or {})
    state = {_from_peft_key(k, weights): v for k, v in _load_weights(weights).items()}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k})
    return settings, modules, state, weights


_NUMBER = (int, float)


def _load_weights(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (the adapter's weights)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def _check_adapter_fits(model, directory, weights, settings, modules, state, existing) -> None:
    """Every adapter tensor has a place in the model, of the shape the settings give it."""
    linear = linear_layers(model)
    expected = {}
    for name in modules:
        layer = existing.get(name) or linear.get(name)
        if layer is None:
            raise ValueError(f"{directory}: module {name!r} is not a linear layer of this model (a different base "
                             f"model?); linear layers look like {some_linear_names(model)}")
        r = existing[name].r if name in existing else pattern_value(settings["rank_pattern"], name, settings["r"])
        expected[f"{name}.lora_A.weight"] = (r, layer.in_features)
        expected[f"{name}.lora_B.weight"] = (layer.out_features, r)
        if settings["dora"]:
            expected[f"{name}.lora_magnitude_vector.weight"] = (layer.out_features,)
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in state.items():
        plain = key if key in params else key.replace(".base_layer.", ".")  # a bias inside a layer LoRA will wrap
        shape = expected.get(key) or (tuple(params[plain].shape) if plain in params and not is_lora_key(key) else None)
        if shape is None:
            raise ValueError(f"{weights}: tensor {key!r} has no place in this model (a different base model?)")
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{weights}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(shape)} "
                             "(a different r, or a different base model?)")
    absent = sorted(set(expected) - set(state))
    if absent:
        raise ValueError(f"{weights}: missing LoRA tensors {absent[:3]}")
    _check_full_tensors(model, weights, settings, state, existing)


def _without_base_copies(model: nn.Module, settings: dict, state: dict) -> dict:
    """The adapter's tensors less those of a module to save that are the base's own, unchanged: tensors tied to one
    outside the module (BERT's LM-head weight, the word embeddings) and buffers, which PEFT writes with the module
    and which stay frozen here."""
    saved = modules_to_save_names(model, settings.get("modules_to_save", ()), "modules_to_save")
    everything = list(model.named_parameters(remove_duplicate=False))
    params = dict(everything)
    own = {**dict(model.named_buffers()), **params}
    kept = {}
    for key, tensor in state.items():
        module, mine = _module_of(key, saved), own.get(key)
        tied = mine is not None and module is not None and bool(tied_elsewhere(everything, mine, module))
        if module is None or mine is None or not (tied or key not in params) \
                or mine.shape != tensor.shape or not torch.equal(mine.detach().to(tensor.dtype), tensor):
            kept[key] = tensor
    return kept


def _module_of(key: str, modules) -> str | None:
    """The one of `modules` that tensor `key` lies in, or None."""
    return next((m for m in modules if key.startswith(m + ".")), None)


def _check_full_tensors(model, weights, settings, state, existing) -> None:
    """The adapter's tensors trained in full each lie in one of its modules_to_save (or match its also_train), and
    none is tied to a tensor outside its module (PEFT keeps a copy of such a module; here modules train in place,
    so loading it would change the tied tensor too). Into a model with LoRA layers, only onto its own."""
    saved = modules_to_save_names(model, settings["modules_to_save"], f"{weights}: modules_to_save")
    regexes = compile_patterns(settings["also_train"], f"{weights}: also_train")
    everything = list(model.named_parameters(remove_duplicate=False))
    params, ours = dict(everything), {id(p) for p in full_tensors(model).values()} if existing else None
    for key in (k for k in state if not is_lora_key(k)):
        module = _module_of(key, saved)
        if module is None and not any(rx.search(key) for rx in regexes):
            raise ValueError(f"{weights}: tensor {key!r} is neither LoRA's nor in one of the adapter's modules_to_save "
                             f"({settings['modules_to_save']})")
        tensor = params[key] if key in params else params[key.replace(".base_layer.", ".")]  # LoRA will wrap it
        tied = tied_elsewhere(everything, tensor, module) if module else []
        if tied:
            raise ValueError(f"{weights}: {key} is tied to {tied[0]}, outside modules_to_save {module!r}: PEFT trains "
                             "a copy of the module, this engine trains it in place; loading it would change both")
        if ours is not None and id(tensor) not in ours:
            raise ValueError(f"{weights}: {key} trains in full in this adapter and not in the model's LoRA setup; "
                             "load the adapter into a model without LoRA layers")


def _from_peft_key(key: str, where: str = "PEFT adapter") -> str:
    """A PEFT key as the tensor's name in the model: LoRA's adapter name dropped, and a modules_to_save tensor as
    the module's own (PEFT writes `X.weight`; `X.modules_to_save.default.weight`, the name inside a PeftModel, is
    read too)."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"{where}: unexpected key {key!r} (expected the prefix {PEFT_PREFIX!r})")
    key = key[len(PEFT_PREFIX):]
    key = key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
    key = re.sub(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$", ".lora_magnitude_vector.weight", key)
    return re.sub(r"\.lora_([AB])(\.[^.]+)?\.weight$", r".lora_\1.weight", key)


def _to_peft_key(name: str) -> str:
    """PEFT writes DoRA's magnitude without `.weight` (`...q_proj.lora_magnitude_vector`); A and B with it."""
    if name.endswith(".lora_magnitude_vector.weight"):
        name = name[:-len(".weight")]
    return PEFT_PREFIX + name


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_magnitude_vector." in name


def save_adapter_folder(model: nn.Module, path: str, log=print) -> str | None:
    """A LoRA model's adapter alone into `path` (PEFT format, tensors trained in full as its modules_to_save; ours
    where PEFT's cannot name them), swapped in atomically. None when the model has no (unmerged) LoRA layers."""
    import shutil

    from finetune.store.outputs import replace_dir

    layers = lora_layers(model)
    if not layers or any(m.merged for m in layers.values()) or not hasattr(model, "lora_config"):
        return None
    path = os.path.abspath(os.fspath(path))
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    try:
        fmt = "peft"
        save_adapter(model, path + ".tmp", format=fmt)
    except ValueError as err:  # full tensors PEFT's modules_to_save cannot name as they are (tied outside)
        log(f"adapter: PEFT's format cannot hold it ({err}); our format instead")
        shutil.rmtree(path + ".tmp", ignore_errors=True)
        fmt = "finetune"
        save_adapter(model, path + ".tmp", format=fmt)
    replace_dir(path + ".tmp", path)
    log(f"adapter ({fmt} format) saved to {path}")
    return path


BESIDE_MODEL["adapter"] = save_adapter_folder  # OUTPUT_DIR/adapter beside model/ (finetune.store.export.save_outputs)
