"""What is set on a loaded model before it trains: activation checkpointing, dropout rates, and freezing the
pooler an encoder-decoder model never reads."""
from __future__ import annotations

from torch import nn

from finetune.checks import in_unit_interval
from finetune.families import family_of


def drop_unused_pooler(model: nn.Module) -> bool:
    """Remove the BERT pooler an encoder-decoder model keeps in its encoder (the family's `unused_pooler`): no
    seq2seq forward reads it, transformers rebuilds it at random when it reloads a bert2bert, and the engine never
    saves one. True when one was removed."""
    if not family_of(model).unused_pooler or getattr(model.encoder, "pooler", None) is None:
        return False
    model.encoder.pooler = None
    return True


def freeze_unused_pooler(model: nn.Module, log=print) -> None:
    """An EncoderDecoderModel built by `from_encoder_decoder_pretrained` keeps BERT's pooler in its encoder. No
    seq2seq forward reads it, so it would get no gradient and stop training at the gradient check: freeze it."""
    if not family_of(model).unused_pooler:
        return
    pooler = getattr(getattr(model, "encoder", None), "pooler", None)
    if pooler is not None and any(p.requires_grad for p in pooler.parameters()):
        pooler.requires_grad_(False)
        log("encoder.pooler is unused by an encoder-decoder model (it gets no gradient): frozen")



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
    if not in_unit_interval(p):
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

