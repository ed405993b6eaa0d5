"""Training-state checkpoints: atomic, checksummed, resumable, and free of pickles.

A checkpoint is a folder `checkpoints/step-00000123/`:

    model.safetensors      the trainable tensors only when fewer than half the parameters train, else every
                           tensor of the state dict
    optimizer.safetensors  the optimizer's per-parameter state, flattened (`state.<i>.<key>`)
    rng.safetensors        torch CPU (and CUDA) generator states
    state.json             step, epoch, position in the epoch, scheduler, scaler, python/numpy RNG, the config,
                           the trainable names, a fingerprint of the model and of the data, optimizer groups
    manifest.json          size and SHA-256 of every file above; written last

It is written into a temporary folder, each file flushed and fsynced, then renamed into place; the
`latest` pointer file is replaced (os.replace) only after that. A kill at any moment leaves either the
old `latest` or the new complete checkpoint. Loading checks the manifest first, and reads tensors only
through safetensors and everything else through JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from finetune.distributed import load_full_state
from finetune.store.outputs import replace_dir
from finetune.train.optim import (family_adam, flat_optimizer_state, nested_optimizer_state, optimizer_name,
                                  training_recipe)

MANIFEST = "manifest.json"
LATEST = "latest"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
# Config fields that must match for an exact resume (the rest, e.g. output_dir or log_every, may change).
ADDED_LATER = {"streaming": False, "stream_buffer": 10_000}  # config keys newer than some checkpoints: their defaults
RESUME_MUST_MATCH = ("optimizer", "seed", "batch_size", "max_tokens", "grad_accum", "group_by_length", "streaming",
                     "stream_buffer",
                     "max_source_length",
                     "max_target_length",
                     "lr", "weight_decay", "betas", "eps", "no_decay", "lr_overrides", "schedule", "warmup_ratio",
                     "warmup_steps", "epochs", "max_steps", "label_smoothing", "precision", "max_grad_norm",
                     "best_metric", "eval_every", "eval_max_samples", "eval_num_beams", "early_stopping_threshold")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, incomplete, or for another model, data or config."""


def model_fingerprint(model: nn.Module) -> str:
    """Names, shapes and dtypes of the state dict: equal for the same architecture."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return h.hexdigest()


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _model_tensors(model: nn.Module, state: dict | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """What model.safetensors holds; `state` is a state dict gathered from FSDP shards (else the model's own)."""
    params = dict(model.named_parameters())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    if trainable * 2 < total:
        return {n: (p if state is None else state[n]).detach() for n, p in params.items() if p.requires_grad}, True
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():  # tied tensors once (safetensors refuses shared storage)
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP shard: its local part
        key = (local.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if local.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = (tensor if state is None else state[name]).detach()
    return out, False


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's random generators: torch (CPU, CUDA) as tensors, python and numpy as JSON values."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                               float(np_state[4])]}


def save_checkpoint(directory: str, model, optimizer, scheduler, scaler, progress: dict, config: dict,
                    keep_last: int = 2, rng_states: list | None = None, model_state: dict | None = None,
                    optimizer_state: dict | None = None, protect=()) -> str:
    """Write one checkpoint atomically under `directory` and point `latest` at it; prune to `keep_last`.

    `rng_states` holds every rank's `rng_state()` (rank order); by default this process's alone. Under FSDP,
    `model_state` and `optimizer_state` are the full states gathered from the shards
    (`distributed.full_state_dict`, `distributed.full_optimizer_state`); the files are the same as without.
    """
    os.makedirs(directory, exist_ok=True)
    name = f"step-{progress['step']:08d}"
    final = os.path.join(directory, name)
    tmp = os.path.join(directory, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model_tensors, sparse = _model_tensors(model, model_state)
    save_file({k: v.contiguous() for k, v in model_tensors.items()}, os.path.join(tmp, "model.safetensors"))
    opt_tensors, opt_meta = flat_optimizer_state(optimizer.state_dict() if optimizer_state is None else optimizer_state)
    save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    rng_states = rng_states or [rng_state()]
    rng_tensors = {f"rank{r}.{k}": v for r, (tensors, _) in enumerate(rng_states) for k, v in tensors.items()}
    rng_meta = [meta for _, meta in rng_states]
    save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {
        **progress, "config": config, "sparse_model": sparse, "trainable": _trainable(model),
        "model_fingerprint": model_fingerprint(model), "base_model": getattr(model.config, "_name_or_path", None),
        "optimizer": opt_meta, "scheduler": sched, "scaler": scaler.state_dict() if scaler else None, "rng": rng_meta,
    }
    _fsync_write_json(os.path.join(tmp, "state.json"), state)
    manifest = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)), "sha256": _sha256(os.path.join(tmp, f))}
                for f in FILES}
    _fsync_write_json(os.path.join(tmp, MANIFEST), manifest)
    replace_dir(tmp, final)  # atomic even when a checkpoint of this step exists (a resumed run writes it again)
    pointer_tmp = os.path.join(directory, f".{LATEST}.tmp")
    with open(pointer_tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(directory, LATEST))
    # keep the newest `keep_last` up to this one; never touch a newer one (left by a run resumed from an
    # older checkpoint: it is the user's, not ours to delete)
    # `protect`: checkpoints pruning never deletes (the best evaluation's)
    protected = {os.path.basename(os.path.normpath(p)) for p in protect if p}
    older = [n for n in list_checkpoints(directory) if n <= name and n not in protected]
    for old in older[:-keep_last]:
        shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
    return final


def list_checkpoints(directory: str) -> list[str]:
    """Complete-looking checkpoint folders, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if re.fullmatch(r"step-\d{8}", n)]
    return sorted(names)


def verify(path: str) -> None:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder (pass 'latest' or a checkpoints/step-N folder)")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint is incomplete")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err}); the checkpoint is corrupt") from None
    if not isinstance(manifest, dict) or set(manifest) != set(FILES) or not all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in manifest.values()):
        raise CheckpointError(f"{manifest_path}: not a checkpoint manifest (expected size and sha256 of "
                              f"{', '.join(FILES)}); the checkpoint is corrupt")
    for name, expected in manifest.items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"{file}: missing")
        size = os.path.getsize(file)
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, {expected['bytes']} were written (truncated or corrupt)")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: checksum differs from the one recorded at save time (corrupt)")


def find_checkpoint(directory: str, resume: str) -> str:
    """Resolve `resume` ("latest" or a path) to a verified checkpoint folder.

    "latest" falls back to the newest older checkpoint that verifies, saying so; a path must verify.
    """
    if resume != "latest":
        verify(resume)
        return resume
    pointer = os.path.join(directory, LATEST)
    candidates = list_checkpoints(directory)
    named = None
    if os.path.exists(pointer):
        try:
            with open(pointer, encoding="utf-8") as f:
                named = f.read().strip()
        except (OSError, UnicodeDecodeError):
            named = ""
        if not re.fullmatch(r"step-\d{8}", named or ""):
            warnings.warn(f"{pointer}: empty or damaged ({named!r:.40}); using the newest checkpoint that verifies",
                          stacklevel=2)
            named = None
    if named is not None:
        candidates = [c for c in candidates if c <= named]
    if not candidates:
        raise CheckpointError(f"{directory}: no checkpoint to resume from (start without resume, or check "
                              "output_dir)")
    errors = []
    for name in reversed(candidates):
        path = os.path.join(directory, name)
        try:
            verify(path)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if errors:
            warnings.warn(f"resume='latest': skipped a bad checkpoint ({'; '.join(errors)}); falling back to {path}",
                          stacklevel=2)
        return path
    raise CheckpointError(f"{directory}: no usable checkpoint: " + "; ".join(errors))


def load_checkpoint(path: str, model, optimizer, scheduler, scaler, config: dict, data_hash: str,
                    rank: int = 0, world_size: int = 1, fsdp: bool = False, eval_hash: str | None = None) -> dict:
    """Check compatibility, then restore model tensors, optimizer, scheduler, scaler and this rank's RNG;
    returns state.json. With `fsdp`, every rank reads the full tensors and keeps its shard of them.

    `eval_hash`: the evaluation data's fingerprint. When the run keeps a best model, evaluation data other than
    the checkpoint's are refused (the best value was measured on those); otherwise a change is a warning."""
    state = _read_state(path)
    problems = _resume_problems(state, model, config, data_hash, world_size) + \
        _evaluation_data_problems(path, state, config, eval_hash)
    if problems:
        raise CheckpointError(f"cannot resume from {path}: " + "; ".join(problems))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    if not fsdp:
        _copy_into(model, tensors)
    opt_state = nested_optimizer_state(load_file(os.path.join(path, "optimizer.safetensors")), state["optimizer"])
    if fsdp:
        load_full_state(model, optimizer, tensors,
                        {"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    else:
        current = optimizer.state_dict()
        groups = [{**g, **({"names": c["names"]} if "names" in c else {})}
                  for g, c in zip(state["optimizer"]["param_groups"], current["param_groups"])]
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    _restore_rng(path, state, rank)
    return state


def _read_state(path: str) -> dict:
    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        for key in ("step", "epoch", "window", "model_fingerprint", "trainable", "config", "data_fingerprint",
                    "optimizer", "scheduler", "rng"):
            state[key]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}/state.json: unreadable or incomplete ({err!r}); the checkpoint is corrupt"
                              ) from None
    return state


def _resume_problems(state: dict, model, config: dict, data_hash: str, world_size: int) -> list[str]:
    """What differs between the checkpoint's run and this one: world size, model, trainable tensors, the settings
    a resume must keep (RESUME_MUST_MATCH), the training data."""
    problems = []
    saved_world = state.get("world_size", 1)
    if saved_world != world_size:
        problems.append(f"it was written by {saved_world} process(es) and this run has {world_size}: the batches "
                        "each rank saw and its random state do not carry over; resume with the same world size")
    if state["model_fingerprint"] != model_fingerprint(model):
        problems.append("the model differs (parameter names or shapes)")
    if state["trainable"] != _trainable(model):
        ours, theirs = set(_trainable(model)), set(state["trainable"])
        problems.append(f"the trainable parameters differ ({len(ours - theirs)} trainable now but not then, "
                        f"{len(theirs - ours)} then but not now, e.g. {sorted(ours ^ theirs)[:2]})")
    used = _as_used(model, config.get("optimizer"))
    for key in RESUME_MUST_MATCH:  # a key newer than the checkpoint had its default then
        saved, now = state["config"].get(key, ADDED_LATER.get(key)), config.get(key)
        if _normalise(used.get(key, _same)(saved)) != _normalise(used.get(key, _same)(now)):
            problems.append(f"config.{key} was {saved!r}, is now {now!r}")
    if state["data_fingerprint"] != data_hash:
        problems.append("the training data differ (tokenised examples)" if state.get("fingerprints") == 2 else
                        "the training data cannot be compared: the checkpoint predates the data fingerprint of "
                        "finetune.data.columns (resume it with the finetune it was written by, or start a fresh run)")
    return problems


def _evaluation_data_problems(path: str, state: dict, config: dict, eval_hash: str | None) -> list[str]:
    """Other evaluation data than the checkpoint's: refused when a best model is kept, else a warning."""
    if "eval_fingerprint" not in state or state["eval_fingerprint"] == eval_hash:
        return []
    what = ("there was no evaluation data then" if state["eval_fingerprint"] is None else
            "there is no evaluation data now" if eval_hash is None else "the evaluation data differ")
    if config.get("best_metric"):
        return [f"{what} (tokenised examples): the best {config['best_metric']} so far was measured on "
                "the checkpoint's evaluation data; resume with the same data, or start a fresh run"]
    warnings.warn(f"resuming from {path}: {what}; evaluations before and after it are not comparable", stacklevel=3)
    return []


def _restore_rng(path: str, state: dict, rank: int) -> None:
    """This rank's generators as the checkpoint recorded them: torch (CPU, CUDA), Python, NumPy."""
    rng = load_file(os.path.join(path, "rng.safetensors"))
    prefix = f"rank{rank}."
    torch.set_rng_state(rng[prefix + "torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith(prefix + "torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = state["rng"][rank]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["rng"][rank]["numpy"]
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))


def load_model_tensors(path: str, model) -> None:
    """Put a verified checkpoint's model tensors into `model` (all of them, or the trainable ones a sparse
    checkpoint holds: the frozen rest is unchanged since)."""
    verify(path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    missing = [k for k in tensors if k not in model.state_dict()]
    if missing:
        raise CheckpointError(f"{path}: tensors {missing[:3]} have no place in this model")
    _copy_into(model, tensors)


def _copy_into(model, tensors: dict) -> None:
    own = model.state_dict()
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)


def _same(value):
    return value


def _as_used(model, optimizer: str | None) -> dict:
    """What a setting left unset (None) means for this model, so a resume compares what was used, not how it was
    spelt: the optimizer, betas and eps of the family's recipe, and the lr and schedule of the optimizer's (the
    one configured now: a changed optimizer is reported on its own)."""
    betas, eps = family_adam(model)
    recipe = training_recipe(model, optimizer, None, None)
    return {"optimizer": lambda v: optimizer_name(model, v), "betas": lambda v: betas if v is None else v,
            "eps": lambda v: eps if v is None else v, "lr": lambda v: recipe.lr if v is None else v,
            "schedule": lambda v: recipe.schedule if v is None else v}


def _normalise(value):
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value
