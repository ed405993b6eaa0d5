"""The trained model as a plain `transformers` checkpoint, and a strict reload of it.

The methods' surgery wraps layers (finetune.methods.lora, finetune.methods.int8, finetune.methods.int4, BitFit's added biases in
finetune.methods.freeze), so the model's own state dict has keys its transformers class does not know
(`q_proj.base_layer.weight`, `lora_A`, `inner.weight`, `q.base.weight`). Each wrapper says what plain layer it
computes as (`plain_linear`), and `plain_state_dict` writes it back under the plain layer's names:

    LoRA          W + (alpha / r) B A   (nothing added when the layer is merged already)
    DoRA          m / ||W + (alpha / r) B A||_row * (W + (alpha / r) B A)
    int8, 4-bit   the dequantised float weight
    added bias    the base weight, and the bias beside it (`q.bias`) - which T5's class has no place for

A model saved this way (`save_plain`) reloads with `from_pretrained` and computes what the trained model
computed (LoRA: up to float rounding; int8: the dequantised weights, without int8's activation rounding).
T5 with BitFit's added biases is the one exception: plain `T5ForConditionalGeneration` has no bias in its
linear layers, so the biases are listed in `finetune_model.json`, and `finetune.models.load_seq2seq` adds
them back before loading (plain `from_pretrained` would report them as unexpected keys and drop them).
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import torch
from torch import nn

from finetune.store.outputs import OutputDirError, replace_dir

MARKER = "finetune_model.json"  # written into every model folder the engine saves; its presence makes loading strict


def _outer_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """The wrapped layers by name: modules with `plain_linear`, the outermost one of each nest."""
    wrappers, inside = {}, set()
    for name, module in model.named_modules():
        if id(module) in inside or not hasattr(module, "plain_linear"):
            continue
        wrappers[name] = module
        inside.update(id(m) for m in module.modules() if m is not module)
    return wrappers


def plain_state_dict(model: nn.Module, state: dict | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict under the model class's own names (see the module docstring), and the names of layers
    that carry an added bias. `state` is a full state dict gathered from FSDP shards (else the model's).

    A wrapped layer is any module with `plain_linear(state, prefix) -> (weight, bias, added_bias)`: the outermost
    one of each nest says what it computes as (a wrapper over a wrapper asks the inner one)."""
    state = dict(model.state_dict() if state is None else state)
    wrappers = _outer_wrappers(model)
    plain = {name: module.plain_linear(state, name + ".") for name, module in wrappers.items()}
    for name in wrappers:
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
    for name, (weight, bias, _) in plain.items():
        state[name + ".weight"] = weight.detach().contiguous()
        if bias is not None:
            state[name + ".bias"] = bias.detach().contiguous()
    return state, sorted(name for name, (_, _, added) in plain.items() if added)


def save_plain(model: nn.Module, tokenizer, path: str, state: dict | None = None,
               extra: dict | None = None) -> list[str]:
    """Write `model` into the folder `path` as a plain transformers checkpoint (safetensors) plus its tokenizer
    and `finetune_model.json`. Returns the layers with added biases (see the module docstring). A model
    with wrapped layers (LoRA, int8 / 4-bit, added biases) is written shard by shard (`save_sharded`): their plain
    weights are computed one shard at a time, never all at once."""
    if _outer_wrappers(model):
        added = save_sharded(model, path, state)
    else:
        plain, added = plain_state_dict(model, state)
        model.save_pretrained(path, safe_serialization=True, state_dict=plain)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    marker = {"saved_by": "finetune", "added_biases": added, **(extra or {})}
    with open(os.path.join(path, MARKER), "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1)
    return added


SHARD_BYTES = 2 * 2**30  # the sharded writer's largest file: the most it holds in memory beside the model


def save_sharded(model: nn.Module, path: str, state: dict | None = None, dtype: torch.dtype | None = None,
                 shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write the plain state dict as safetensors shards of at most ~`shard_bytes` plus their index (one file
    alone: `model.safetensors`, as transformers names it) and the config, computing each wrapped layer's plain
    weight only when its shard is written: the most held at once is one shard, never the whole float model (an
    11B model quantised in memory would need 22 GB in bf16 for it). The wrapped layers' plain weights are written
    in `dtype` (default: the model config's dtype, else float32), the other tensors as they are, tied ones once.
    Returns the layers with added biases."""
    from safetensors.torch import save_file

    dtype = dtype or config_dtype(model.config) or torch.float32
    shards, added = _plan_shards(_plain_items(model, state, dtype), shard_bytes)
    os.makedirs(path, exist_ok=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        with torch.no_grad():
            for _, produce in shard:
                tensors.update(produce())
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(shards) > 1:  # as transformers writes them: one file alone has no index
        with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(path)
    return sorted(added)


def config_dtype(config) -> torch.dtype | None:
    """The floating dtype a model config names (`dtype`, or the older `torch_dtype`; a string or a torch.dtype),
    else None."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _plain_items(model: nn.Module, state: dict | None, dtype: torch.dtype) -> list:
    """(bytes, layer name or None, produce) for each plain tensor (tied ones once, in their own dtype) and each
    wrapped layer (its plain weight and bias in `dtype`); `produce()` gives {name: tensor} (a wrapped layer's also
    whether its bias was added)."""
    state = model.state_dict(keep_vars=True) if state is None else state
    wrappers = _outer_wrappers(model)
    inside = tuple(name + "." for name in wrappers)
    items, seen = [], set()
    for key, tensor in state.items():
        if key.startswith(inside) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        items.append((tensor.numel() * tensor.element_size(), None,
                      lambda key=key, tensor=tensor: {key: tensor.detach().contiguous()}))
    for name, module in wrappers.items():
        def produce(name=name, module=module):
            weight, bias, added = module.plain_linear(state, name + ".")
            out = {name + ".weight": weight.detach().to(dtype).contiguous()}
            if bias is not None:
                out[name + ".bias"] = bias.detach().to(dtype).contiguous()
            return out, added
        items.append((_plain_bytes(module, dtype), name, produce))
    return items


def _plain_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """The bytes of a wrapped layer's plain weight and bias (a shard plan needs no exact figure)."""
    dims = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if None in dims:
        inner = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
        dims = (inner.in_features, inner.out_features) if inner is not None else (0, 0)
    return (dims[0] + 1) * dims[1] * dtype.itemsize


def _plan_shards(items: list, shard_bytes: int) -> tuple[list, list[str]]:
    """The items in shards of at most `shard_bytes` (a larger item alone), in order; and a way to learn which
    wrapped layers carry an added bias (filled in as the shards are produced)."""
    added: list[str] = []

    def tensors_of(name, produce):
        if name is None:
            return produce()
        out, has_added = produce()
        if has_added:
            added.append(name)
        return out

    shards, current, used = [], [], 0
    for size, name, produce in items:
        if current and used + size > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append((size, lambda name=name, produce=produce: tensors_of(name, produce)))
        used += size
    if current:
        shards.append(current)
    return shards, added


def read_marker(path: str) -> dict | None:
    """`finetune_model.json` of a saved model folder, or None when the folder was not written by the engine."""
    file = os.path.join(path, MARKER)
    if not os.path.exists(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: unreadable ({err}); the folder was written by finetune but this file is damaged")
    if not isinstance(marker, dict) or not isinstance(marker.get("added_biases", []), list):
        raise ValueError(f"{file}: not a finetune model marker (expected a JSON object with 'added_biases')")
    return marker



def save_model_folder(model: nn.Module, tokenizer, path: str, state: dict | None = None, log=print) -> str:
    """`save_plain` into a folder beside `path`, then swapped in atomically (finetune.store.outputs.replace_dir): at
    every instant `path` holds a complete model, the old or the new one."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"save: {path} exists and is a file, not a model folder; choose another path")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    added = save_plain(model, tokenizer, tmp, state=state)
    if added:
        log(f"{path}: {len(added)} layers carry biases BitFit added; plain from_pretrained drops them - load this "
            "folder with finetune.models.load_seq2seq (or `finetune eval`), which puts them back")
    replace_dir(tmp, path)
    return path


# What goes beside OUTPUT_DIR/model: folder name -> writer(model, path, log) returning the path, or None when the
# model has nothing for it. finetune.methods.adapters registers LoRA's "adapter" (its layers' adapter alone, PEFT format).
BESIDE_MODEL: dict = {}


def save_outputs(model: nn.Module, tokenizer, output_dir: str, state: dict | None = None, log=print,
                 extras: bool = True, merged: bool = True) -> str:
    """OUTPUT_DIR/model (`save_model_folder`), then each registered folder beside it (`BESIDE_MODEL`). Returns
    model/'s path. `merged=False`: only the folders beside it (LoRA's adapter/, which names its base model, as
    PEFT saves), for a base too large to write again; a model with nothing to write beside it gets model/ anyway."""
    written = []
    if extras:
        for name, write in BESIDE_MODEL.items():
            written += [p for p in [write(model, os.path.join(output_dir, name), log)] if p]
    if merged or not written:
        if not merged:
            log("save_merged=false, but this model has no adapter to save alone: model/ is written")
        return save_model_folder(model, tokenizer, os.path.join(output_dir, "model"), state, log)
    return written[0]
