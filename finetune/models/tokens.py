"""The special-token contract every model the engine trains goes through, and the length limits it checks.

`resolve_special_tokens` reads the pad, decoder start and eos ids from the model config, its generation config
and the tokenizer, refuses when they disagree or are missing, and writes the agreed ids back to both configs so
that training (the label shift) and generation (the first decoder token, the stop token) use the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from finetune.families import family_of


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



def _configs_to_update(model):
    configs = [model.config]
    if getattr(model, "generation_config", None) is not None:
        configs.append(model.generation_config)
    return configs



def check_length(model: nn.Module, name: str, value: int, where: str) -> None:
    """A length beyond the learned position table of the side that reads it is an error naming the limit
    (`max_source_length`: the encoder; `max_target_length`, `max_new_tokens`: the decoder)."""
    config = model.config
    side = getattr(config, "encoder", config) if name == "max_source_length" else getattr(config, "decoder", config)
    limit = getattr(side, "max_position_embeddings", None)
    if limit and value > limit:
        which = "encoder" if name == "max_source_length" else "decoder"
        raise ValueError(f"{where}={value} exceeds the model's {limit} learned positions ({which}); set it <= {limit}")

