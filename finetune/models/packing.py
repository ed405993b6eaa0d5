"""Packed (padding-free) encoder-decoder batches: the model side.

A packed micro-batch (finetune.data.collate.PackedCollator) is one row: the sources of its pairs one after the
other on the encoder side, their shifted targets likewise on the decoder side, and the pairs' lengths. No pad
token is computed. For the model to see each pair as if it were alone:

- attention stays within a pair: encoder self-attention and cross-attention block-diagonal, decoder
  self-attention block-diagonal and causal (T5X's `encoder_segment_ids` / `decoder_segment_ids`);
- positions restart at 0 in every pair: learned position embeddings get each pair's positions (BERT's stacks as
  `position_ids`, BART's position-embedding modules through a pre-hook); T5's relative bias needs nothing (it
  depends on key - query only, so a pair's block of the row's bias is the bias it would get alone).

`packed_inputs(batch)` builds the three boolean block masks and passes them where the model routes them (the
cross-attention mask as `attention_mask`, the decoder's as `decoder_attention_mask`; a hook on the encoder swaps
in its own). Each mask carries the pairs' (query lengths, key lengths) as an attribute. The masks are real, so
any attention implementation computes the right thing; with the attribute, the `packed_*` implementations that
`enable_packing` installs run attention pair by pair instead (each pair's own keys: no work on the masked
blocks). Everything travels as the layers' arguments, so activation checkpointing's recomputation and DDP see
the same. tests/models/test_packing.py pins a packed batch's loss and gradients to its pairs trained unpacked
(BART, T5, bert2bert).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from finetune.families import family_of
from finetune.models.attention import NAME, attention_configs, in_float32

BASES = ("sdpa", "sdpa_float32", "eager")  # attention implementations a packed one wraps
POSITION_MODULES = ("embed_positions", "position_embeddings")  # learned absolute positions: BART, BERT
PACKED = "packed_"


def block_mask(query_lengths: list[int], key_lengths: list[int], causal: bool, device) -> torch.Tensor:
    """[1, 1, queries, keys] boolean mask (True = attend): query segment i sees key segment i only (and, `causal`,
    only keys at or before its own position in the segment). It carries `packed_segments` = (query lengths, key
    lengths) for the packed attention implementations."""
    mask = _segment_ids(query_lengths, device)[:, None] == _segment_ids(key_lengths, device)[None, :]
    if causal:
        mask &= torch.ones_like(mask).tril()
    mask = mask[None, None]
    mask.packed_segments = (list(query_lengths), list(key_lengths))
    return mask


def _segment_ids(lengths: list[int], device) -> torch.Tensor:
    """[total] the segment of each position: [0] * n1 + [1] * n2 + ..."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))


def segment_positions(lengths: list[int], device) -> torch.Tensor:
    """[total] positions that restart at 0 in every segment: [0..n1-1, 0..n2-1, ...]."""
    sizes = torch.tensor(lengths, device=device)
    starts = torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    return torch.arange(len(starts), device=device) - starts


def packed_inputs(batch: dict) -> dict:
    """The model's keyword arguments for a packed batch (see the module docstring)."""
    source, target = batch["source_lengths"].tolist(), batch["target_lengths"].tolist()
    device = batch["input_ids"].device
    encoder = block_mask(source, source, False, device)
    encoder.packed_positions = segment_positions(source, device)
    decoder = block_mask(target, target, True, device)
    decoder.packed_positions = segment_positions(target, device)
    cross = block_mask(target, source, False, device)
    cross.packed_encoder_mask = encoder
    return {"input_ids": batch["input_ids"], "attention_mask": cross, "decoder_input_ids": batch["decoder_input_ids"],
            "decoder_attention_mask": decoder}


# ---------------------------------------------------------------------------------------------------------------
# attention pair by pair

def _per_pair(base):
    """A transformers attention function that runs `base` on each pair's block when the mask says the batch is
    packed, and `base` itself otherwise (unpacked batches, evaluation, generation)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        run = ALL_ATTENTION_FUNCTIONS[base] if base != "eager" else _eager_of(module)
        segments = getattr(attention_mask, "packed_segments", None)
        if segments is None:
            return run(module, query, key, value, attention_mask, **kwargs)
        if base == NAME and in_float32(query, max(segments[1])):  # every pair in float32: cast the row once
            bias = kwargs.get("position_bias")
            kwargs["position_bias"] = None if bias is None else bias.float()
            with torch.autocast("cpu", enabled=False):
                out, _ = _pairs(ALL_ATTENTION_FUNCTIONS["sdpa"], "sdpa", module, query.float(), key.float(),
                                value.float(), segments, kwargs)
            return out.to(query.dtype), None
        return _pairs(run, base, module, query, key, value, segments, kwargs)

    return attention


def _pairs(run, base, module, query, key, value, segments, kwargs):
    """`run` on each pair's block of query / key / value (and of T5's position bias, which is relative, so a pair's
    block is the top-left one); the outputs side by side again."""
    bias = kwargs.pop("position_bias", None)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    outputs = []
    # torch.split, not slices: its backward joins the pieces' gradients once, where each slice's would fill a
    # zero tensor the size of the whole row
    pieces = zip(segments[0], segments[1], query.split(segments[0], dim=2), key.split(segments[1], dim=2),
                 value.split(segments[1], dim=2))
    for nq, nk, q, k, v in pieces:
        mask = _causal_additive(nq, query.dtype, query.device) if causal and base == "eager" else None
        extra = {} if bias is None else {"position_bias": bias[..., :nq, :nk]}
        out, _ = run(module, q, k, v, mask, **kwargs, **extra)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def _eager_of(module):
    """The model's own eager attention function (BART, T5 and BERT each define one in their modeling module)."""
    import sys

    return sys.modules[type(module).__module__].eager_attention_forward


def _causal_additive(n: int, dtype, device) -> torch.Tensor:
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.zeros(1, 1, n, n, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def register() -> None:
    """`packed_<base>` attention implementations (idempotent), with their base's mask function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    from finetune.models.attention import register as register_float32

    register_float32()
    for base in BASES:
        AttentionInterface.register(PACKED + base, _per_pair(base))
        AttentionMaskInterface.register(PACKED + base, eager_mask if base == "eager" else sdpa_mask)


# ---------------------------------------------------------------------------------------------------------------
# installing it on a model

def enable_packing(model: nn.Module) -> None:
    """Make `model` train on packed batches: the `packed_*` attention on every config, the hooks that route the
    encoder's mask and restart the learned positions. Raises ValueError (naming TrainConfig.pack) where packing
    is not known to be right: a family whose positions the table does not describe, an attention implementation
    other than sdpa / eager."""
    family = family_of(model)
    parts = [family_of(model.get_encoder()), family_of(model.get_decoder())] if family.name == "encoder-decoder" else []
    for part in [family] + parts:  # an EncoderDecoderModel: its encoder's and decoder's families too (not RoBERTa)
        if part.positions not in ("learned", "relative"):
            raise ValueError(f"TrainConfig.pack: packed batches are tested for BART, T5 and bert2bert models; this "
                             f"model's family is {part.name!r}, whose position scheme the engine does not know "
                             "(finetune/families.py); set pack=False")
    configs = _attention_configs(model)
    encoder = model.get_encoder()
    if not getattr(encoder, "_packed_mask_hook", False):  # first: the position hook reads the swapped mask
        encoder.register_forward_pre_hook(_swap_encoder_mask, with_kwargs=True)
        encoder._packed_mask_hook = True
    if family.positions == "learned":
        for stack in (encoder, model.get_decoder()):
            _hook_positions(stack, family.name)
    register()
    for config in configs:
        if not config._attn_implementation.startswith(PACKED):
            config._attn_implementation = PACKED + config._attn_implementation


def _attention_configs(model: nn.Module) -> list:
    """Every config object of the model and its layers (`attention_configs`), checked: one of BASES."""
    configs = attention_configs(model)
    for config in configs:
        name = config._attn_implementation
        if name.removeprefix(PACKED) not in BASES:
            raise ValueError(f"TrainConfig.pack: packed batches need 'sdpa' or 'eager' attention; this model uses "
                             f"{name!r} (load it with attn_implementation='sdpa'), or set pack=False")
    if not configs:
        raise ValueError("TrainConfig.pack: the model has no transformers config naming its attention; set pack=False")
    return configs


def _swap_encoder_mask(module, args, kwargs):
    """Forward pre-hook on the encoder: a packed call's `attention_mask` is the cross-attention mask, which carries
    the encoder's own (`packed_encoder_mask`)."""
    own = getattr(kwargs.get("attention_mask"), "packed_encoder_mask", None)
    if own is not None:
        kwargs["attention_mask"] = own
    return args, kwargs


def _hook_positions(stack: nn.Module, family: str) -> None:
    """Restart the stack's learned positions at every segment of a packed call (the row may be longer than the
    position table: only each pair's positions are ever looked up). A stack that takes `position_ids` (BERT) gets
    them, with zero `token_type_ids` (BERT's buffered ones are only a table long); otherwise (BART) its
    position-embedding module gets them, from a pre-hook that reads them off the call's `attention_mask`."""
    if getattr(stack, "_packed_positions_hook", False):
        return
    takes = set(inspect.signature(stack.forward).parameters)
    if "position_ids" in takes:
        stack.register_forward_pre_hook(_positions_to_stack(takes), with_kwargs=True)
    else:
        found = [m for name, m in stack.named_modules() if name.rsplit(".", 1)[-1] in POSITION_MODULES]
        if len(found) != 1 or "position_ids" not in inspect.signature(found[0].forward).parameters:
            raise ValueError(f"TrainConfig.pack: expected one position embedding that takes position_ids in the "
                             f"{family} model's {type(stack).__name__}, found {len(found)}; set pack=False")

        def keep(module, args, kwargs):
            module._packed_positions = getattr(kwargs.get("attention_mask"), "packed_positions", None)

        def give(module, args, kwargs):
            if stack._packed_positions is not None:
                kwargs["position_ids"] = stack._packed_positions
            return args, kwargs

        stack.register_forward_pre_hook(keep, with_kwargs=True)
        found[0].register_forward_pre_hook(give, with_kwargs=True)
    stack._packed_positions_hook = True


def _positions_to_stack(takes: set):
    def give(module, args, kwargs):
        positions = getattr(kwargs.get("attention_mask"), "packed_positions", None)
        if positions is not None:
            kwargs["position_ids"] = positions[None]
            if "token_type_ids" in takes and kwargs.get("token_type_ids") is None:
                kwargs["token_type_ids"] = torch.zeros_like(kwargs["position_ids"])
        return args, kwargs

    return give
