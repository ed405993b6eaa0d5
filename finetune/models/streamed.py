"""Loading a checkpoint with its base quantised as it arrives (int8-lora, qlora): what lets an 11-billion-parameter
T5 load on a machine that could not hold it in float.

The model is built with its parameters on the meta device (no memory; buffers are real), then the safetensors
files are read one at a time, tensor by tensor (each copied out of the file's mapping: `read_tensor`). A linear
layer the method quantises becomes its int8 / 4-bit layer as soon as its weight (and bias) are read; every other
tensor takes its place in the checkpoint's dtype. The peak is the quantised model plus one layer's work, where
loading and then quantising holds the float model and the quantised one together. The codes are those
`apply_method` would make from the loaded model, bit for bit (tests/models/test_streamed.py); `apply_method` with
the same method then adds the adapters and checks that the settings match what was quantised.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

from finetune.methods.quant import linears_to_quantize
from finetune.methods.surgery import replace_module
from finetune.models.adjust import drop_unused_pooler
from finetune.models.load import ModelNotAvailable


def load_quantized(path: str, method: str = "qlora", new_tensors=(), **settings):
    """(model, tokenizer) from a local model folder (a transformers checkpoint or the engine's model/), its linear
    layers quantised by `method` ("int8-lora" or "qlora", with that method's settings) while they load.
    `new_tensors`: tensors the method leaves float (as `apply_method(model, method, new_tensors)` would).
    Then `apply_method(model, method, new_tensors, **settings)` adds the adapters."""
    from transformers import AutoConfig, AutoTokenizer

    from finetune.methods.registry import QUANTIZED_AT_LOAD
    from finetune.methods.registry import method as method_named
    from finetune.methods.registry import quantized_at_load, quantizer_label
    from finetune.store.export import config_dtype, read_marker

    chosen = method_named(method)
    if chosen.quantizer is None:
        raise ValueError(f"load_quantized: method {method!r} does not quantise its base (int8-lora and qlora do); "
                         "load the model with load_seq2seq")
    resolved = chosen.resolve(settings, "load_quantized")
    make_linear, what = chosen.quantizer
    files = weight_files(path)
    config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    marker = read_marker(path)
    model = empty_model(config, (marker or {}).get("added_biases", []))
    record = quantized_at_load(what, new_tensors, resolved)
    targets = linears_to_quantize(model, record["skip"], what, keep_float=not resolved["quantize_kept"])
    with work_buffers_mapped():
        sizes = _stream(model, files, set(targets), make_linear(resolved), config_dtype(config), marker is not None)
    _tie_missing(model)
    _check_complete(model, path)
    setattr(model, QUANTIZED_AT_LOAD, record)
    print(f"{quantizer_label(what, resolved)} while loading {path}: {len(targets)} linear layers; their weights "
          f"{sizes[0] / 2**20:.1f} MiB -> {sizes[1] / 2**20:.1f} MiB, read from {len(files)} file(s)", flush=True)
    return model.eval(), tokenizer


def weight_files(path: str) -> list[str]:
    """The safetensors files of a local model folder: those its index names (sharded), else model.safetensors."""
    path = os.fspath(path)
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise ModelNotAvailable(f"{path}: not a local model folder with config.json (quantising while loading reads "
                                "a folder's safetensors files)")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise ModelNotAvailable(f"{index}: unreadable shard index ({type(err).__name__}: {err})") from None
        missing = [n for n in names if not os.path.exists(os.path.join(path, n))]
        if missing:
            raise ModelNotAvailable(f"{index} names shards that are not in the folder: {missing[:3]}")
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise ModelNotAvailable(f"{path}: no model.safetensors nor model.safetensors.index.json (quantising while "
                                "loading reads safetensors only; convert .bin weights with save_pretrained)")
    return [single]


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter a module registers inside the block is made on the meta device (buffers are not)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_model(config, added_biases=()) -> nn.Module:
    """The model class of `config` with meta parameters; BitFit's added biases (a saved BitFit T5) in place, and
    an encoder-decoder's unused BERT pooler dropped (the engine never saves one)."""
    from transformers import AutoModelForSeq2SeqLM

    from finetune.methods.freeze import add_biases_to

    with parameters_on_meta():
        model = AutoModelForSeq2SeqLM.from_config(config)
        if added_biases:
            add_biases_to(model, added_biases)
    drop_unused_pooler(model)
    return model


def _stream(model, files, targets: set, make_linear, dtype, strict: bool) -> tuple[int, int]:
    """Read `files` one at a time; quantise the `targets` layers as their tensors complete, place the rest.
    Returns (float bytes, quantised bytes) of the quantised layers."""
    from safetensors import safe_open

    parts_of = {name: {"weight"} | ({"bias"} if model.get_submodule(name).bias is not None else set())
                for name in targets}
    pending, unexpected, sizes = {}, [], [0, 0]
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            owner, _, leaf = key.rpartition(".")
            if owner in parts_of and leaf in parts_of[owner]:
                pending.setdefault(owner, {})[leaf] = read_tensor(file, key)
                if set(pending[owner]) == parts_of[owner]:
                    _quantize_into(model, owner, pending.pop(owner), make_linear, sizes)
                    release_freed_memory()
            elif not _place(model, key, read_tensor(file, key), dtype, file):
                unexpected.append(key)
    if pending:
        raise ModelNotAvailable(f"{os.path.dirname(files[0])}: the checkpoint lacks part of layers "
                                f"{sorted(pending)[:3]}")
    if unexpected:
        message = f"{os.path.dirname(files[0])}: tensors the model has no place for: {unexpected[:5]}"
        if strict:
            raise ModelNotAvailable(message + " (this model folder does not match its own config)")
        import warnings

        warnings.warn(message + "; ignored", stacklevel=3)
    return sizes[0], sizes[1]


def read_tensor(file: str, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, in memory of its own. safetensors maps the whole file; every page a
    tensor read touched would stay in the process's resident memory until the file is closed (a 10 GB shard:
    10 GB), so the file is opened for this one tensor and closed again (the pages stay in the page cache)."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return f.get_tensor(key).clone()


def _glibc():
    """The C library when it is glibc (its allocator's controls), else None (macOS, musl: nothing to tune)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


_LIBC = None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim): the blocks under the mmap threshold
    a layer's quantisation freed (without it the process grows by ~0.7 MB a layer of a 256 x 1024 model)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


@contextlib.contextmanager
def work_buffers_mapped():
    """While loading, every block of 1 MiB or more is its own mapping, returned to the system when freed.

    Quantising allocates a float copy and the quantiser's work buffers per layer (tens to hundreds of MB) between
    the small codes it keeps. In glibc's heap those would leave the kept codes scattered over a heap several times
    their size (Flan-T5-large's shape: 2.1 GB of heap holding 0.7 GB), whose free holes training then touches
    again: its resident memory grew by 0.6 GB. Afterwards the thresholds are fixed at the values glibc's dynamic
    rule reaches in a PyTorch process (mmap from 32 MiB, trim above 64 MiB)."""
    libc = _glibc()
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if libc:
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
        release_freed_memory()


def _quantize_into(model, name: str, parts: dict, make_linear, sizes: list) -> None:
    weight = parts["weight"]
    meta = model.get_submodule(name)
    if tuple(weight.shape) != tuple(meta.weight.shape):
        raise ModelNotAvailable(f"{name}.weight: shape {tuple(weight.shape)} in the checkpoint, "
                                f"{tuple(meta.weight.shape)} in its config")
    linear = nn.Linear(meta.in_features, meta.out_features, bias="bias" in parts, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if "bias" in parts:
        linear.bias = nn.Parameter(parts["bias"], requires_grad=False)
    quantized = make_linear(linear)
    sizes[0] += weight.numel() * weight.element_size()
    sizes[1] += quantized.weight_bytes()
    replace_module(model, name, quantized)


def _place(model, key: str, tensor: torch.Tensor, dtype, file: str) -> bool:
    """Put a checkpoint tensor in its place (False when the model has none for it)."""
    owner, _, leaf = key.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    current = module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)
    if current is None:
        return False
    if tuple(current.shape) != tuple(tensor.shape):
        raise ModelNotAvailable(f"{file}: {key} has shape {tuple(tensor.shape)}, the config gives "
                                f"{tuple(current.shape)}")
    if dtype is not None and tensor.dtype.is_floating_point:
        tensor = tensor.to(dtype)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=current.requires_grad)
    else:
        module._buffers[leaf] = tensor.to(current.dtype)
    return True


def _on_meta(model) -> list[str]:
    """The parameters (every name of a tied one) no checkpoint tensor has filled yet."""
    return [name for name, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]


def _tie_missing(model) -> None:
    """Tie what the checkpoint left to its class's tying (T5's embed_tokens, BART's LM head), as from_pretrained
    does: a tied tensor the checkpoint holds with values of its own (Flan-T5's LM head: transformers 5 declares it
    tied, its checkpoints hold it untied) stays its own."""
    model.tie_weights(missing_keys=set(_on_meta(model)), recompute_mapping=True)


def _check_complete(model, path: str) -> None:
    """Every parameter came from the checkpoint (or is tied to one that did): none is left on the meta device."""
    missing = _on_meta(model)
    if missing:
        raise ModelNotAvailable(f"{path}: the checkpoint lacks {len(missing)} tensor(s) of its config ({missing[:5]}); "
                                "quantising while loading cannot initialise them at random. Load it with "
                                "load_seq2seq, then apply_method")
