"""Loading seq2seq models from a folder (or the hub cache): strict for the engine's own model/ folders, loud about
any tensor transformers initialises at random, and a named error for a damaged weights file."""
from __future__ import annotations

import os

import torch

from finetune.models.adjust import drop_unused_pooler


def load_seq2seq(name_or_path: str, **kwargs):
    """`AutoModelForSeq2SeqLM` + `AutoTokenizer` from a hub name or local folder, with a clear offline error.

    A folder the engine saved (it holds `finetune_model.json`) loads strictly: a missing, unexpected or
    mis-shaped tensor is an error, never a randomly initialised layer. Other checkpoints load as transformers
    loads them, and any tensor it initialises at random is named in a warning.
    """
    from finetune.store.export import read_marker
    from finetune.store.outputs import recover_dir

    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path.rstrip("/") + ".old"):
        recover_dir(name_or_path.rstrip("/"))  # a model/ swap interrupted by a kill (two-rename fallback)
    if os.path.isdir(name_or_path) and not os.path.exists(os.path.join(name_or_path, "config.json")):
        raise ModelNotAvailable(f"{name_or_path}: no config.json - not a model folder (a training run writes one "
                                "into OUTPUT_DIR/model)")
    marker = read_marker(name_or_path) if os.path.isdir(name_or_path) else None
    try:
        try:
            return _load(name_or_path, marker, True, kwargs)
        except (OSError, ValueError):
            if os.path.isdir(name_or_path) or os.environ.get("HF_HUB_OFFLINE") == "1":
                raise
            print(f"'{name_or_path}' is not on disk; trying the hub ...", flush=True)
            return _load(name_or_path, marker, False, kwargs)
    except ModelNotAvailable:
        raise
    except Exception as err:  # transformers, safetensors and the tokenizers raise many kinds
        detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        if os.path.isdir(name_or_path):
            damaged_weights(name_or_path)  # a truncated or corrupt weights file: named, with what to do
            raise ModelNotAvailable(
                f"could not load the model folder {name_or_path}: {err.__class__.__name__}: {detail}. A model folder "
                "holds config.json, safetensors weights and the tokenizer files (a training run writes one into "
                "OUTPUT_DIR/model).") from err
        raise ModelNotAvailable(
            f"could not load '{name_or_path}' (not a local folder, and not in the hub cache; this machine may be "
            f"offline): {err.__class__.__name__}: {detail}. Pass a folder holding config.json, safetensors weights "
            "and the tokenizer files.") from err


def _load(name_or_path: str, marker: dict | None, local_only: bool, kwargs: dict):
    """(model, tokenizer) as transformers loads them, its load report checked (`_check_load_report`)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is replaced by the checks below
    try:
        model, info = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, local_files_only=local_only,
                                                           output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_load_report(model, info, name_or_path, marker)
    return model, tokenizer


def _check_load_report(model, info: dict, name_or_path: str, marker: dict | None) -> None:
    """The engine's own folders (`marker`) must match their config exactly (added BitFit biases put back);
    for any other checkpoint, each tensor transformers initialised at random is named in a warning."""
    # a reloaded bert2bert's pooler is rebuilt at random and never read (a trainable tensor without gradient would
    # stop training): dropped, and its keys are not missing
    pooler = ["encoder.pooler."] if drop_unused_pooler(model) else []
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(tuple(pooler)))
    unexpected = sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys", ()))
    if marker is not None:
        added = marker.get("added_biases", [])
        if added:
            _load_added_biases(model, name_or_path, added, unexpected)
            unexpected = [k for k in unexpected if k.rsplit(".", 1)[0] not in set(added)]
        problems = [f"{what}: {keys[:5]}{' ...' if len(keys) > 5 else ''}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]
        if problems:
            raise ModelNotAvailable(f"{name_or_path}: this model folder does not match its own config ("
                                    + "; ".join(problems) + "); it would load partly random. Was it edited "
                                    "or written by another version?")
    elif missing or mismatched:
        import warnings

        warnings.warn(f"{name_or_path}: transformers initialised {len(missing) + len(mismatched)} tensor(s) at "
                      f"random (missing: {missing[:5]}, wrong shape: {mismatched[:5]}); they must be trained",
                      stacklevel=4)


def damaged_weights(folder: str) -> None:
    """Raise ModelNotAvailable naming the first *.safetensors file in `folder` whose header or size is broken
    (a copy cut short, a full disk); return when every one reads."""
    from safetensors import safe_open

    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as err:
            raise ModelNotAvailable(
                f"{path}: damaged weights file ({os.path.getsize(path):,} bytes; {type(err).__name__}: "
                f"{str(err).strip()[:200]}): it was cut short or corrupted (an interrupted copy or save, a full "
                "disk). Copy or save the model again (a training run's model/: its checkpoints/ may still hold "
                "the weights)") from None


def _load_added_biases(model, path: str, added: list[str], unexpected: list[str]) -> None:
    """A saved BitFit T5: put the added biases back (they are `unexpected` to the plain class)."""
    from safetensors import safe_open

    from finetune.methods.freeze import add_biases_to

    add_biases_to(model, added)
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    wanted = {f"{name}.bias" for name in added}
    found = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for key in wanted & set(f.keys()):
                found[key] = f.get_tensor(key)
    if wanted - set(found):
        raise ModelNotAvailable(f"{path}: finetune_model.json lists added biases that the weights lack: "
                                f"{sorted(wanted - set(found))[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in found.items():
            params[key].copy_(value)



class ModelNotAvailable(RuntimeError):
    """The requested checkpoint is neither on disk nor reachable."""
