"""Examples -> batches: label shifting, padding and attention masks, as pure tensor functions, and the
`Collator` that applies them.

The teacher-forcing contract of every encoder-decoder model in `transformers`:

    labels            =  y1  y2  y3  eos  -100 -100
    decoder_input_ids =  s   y1  y2  y3   eos  pad        (s = decoder start token)

The decoder reads the labels shifted one place to the right with the start token first; the loss
compares its output at position t with the *unshifted* label at t. Label padding is -100 (the
ignore index of cross-entropy), never the pad id, and it becomes the pad id only in the decoder
inputs. Getting either half wrong trains a model whose loss falls while it learns to emit blank or
copied lines.
"""
from __future__ import annotations

import torch

from finetune.data.tokenize import Example

IGNORE_INDEX = -100


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels: start token first, labels shifted right, -100 replaced by pad.

    Matches `transformers.models.bart.modeling_bart.shift_tokens_right`, T5's `_shift_right` and
    `EncoderDecoderModel`'s shift (pinned by tests/data/test_collate.py).
    """
    if pad_token_id is None:
        raise ValueError("shift_tokens_right: pad_token_id is None; set it on the model config or tokenizer")
    if decoder_start_token_id is None:
        raise ValueError(
            "shift_tokens_right: decoder_start_token_id is None; set model.config.decoder_start_token_id "
            "(BART: eos </s>, T5: pad, bert2bert: [CLS])"
        )
    if labels.dim() != 2:
        raise ValueError(f"shift_tokens_right: labels must be [batch, length], got shape {tuple(labels.shape)}")
    shifted = labels.new_empty(labels.shape)
    shifted[:, 0] = decoder_start_token_id
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


def pad_labels(sequences: list[list[int]], length: int | None = None) -> torch.Tensor:
    """Right-pad label sequences with -100 (ignored by the loss) to a common length."""
    length = max((len(s) for s in sequences), default=0) if length is None else length
    out = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.as_tensor(seq[:length], dtype=torch.long)
    return out


def pad_inputs(sequences: list[list[int]], pad_token_id: int,
               length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad input sequences with the pad id; returns (input_ids, attention_mask of 1 = real token)."""
    length = max((len(s) for s in sequences), default=0) if length is None else length
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = min(len(seq), length)
        ids[row, :n] = torch.as_tensor(seq[:n], dtype=torch.long)
        mask[row, :n] = 1
    return ids, mask


def decoder_attention_mask(labels: torch.Tensor) -> torch.Tensor:
    """Padding mask for the decoder inputs built by `shift_tokens_right` (1 = attend).

    Position 0 (the start token) is always real and position t>0 is real where label t-1 is. It is
    derived from the labels, not from `decoder_input_ids != pad`, because T5's start token *is* the
    pad id and a pad-based mask would hide it.
    """
    mask = torch.ones_like(labels)
    mask[:, 1:] = (labels[:, :-1] != IGNORE_INDEX).long()
    return mask


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[length, length] boolean mask, True where query position i may attend key position j (j <= i)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, 1, 1, keys] boolean mask from a [batch, keys] 0/1 attention mask: True = attend."""
    return attention_mask.bool()[:, None, None, :]


def combine_masks(causal: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """[batch, 1, queries, keys] boolean mask: attend only where both the causal and padding masks allow."""
    return causal[None, None, :, :] & padding


def to_additive(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean attend-mask to the additive form attention layers add to their scores (0 or dtype min)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def is_packed(batch: dict) -> bool:
    """A batch from PackedCollator (it carries the pairs' lengths)."""
    return "source_lengths" in batch


def pairs_in(batch: dict) -> int:
    """The pairs a collated batch holds: its rows, or a packed batch's segments."""
    return len(batch["source_lengths"]) if is_packed(batch) else len(batch["labels"])


class Collator:
    """Examples -> a batch: inputs padded with pad, labels with -100, decoder inputs shifted from labels."""

    def __init__(self, pad_token_id: int, decoder_start_token_id: int):
        self.pad_token_id = pad_token_id
        self.decoder_start_token_id = decoder_start_token_id

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_inputs([e.input_ids for e in examples], self.pad_token_id)
        labels = pad_labels([e.labels for e in examples])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": shift_tokens_right(labels, self.pad_token_id, self.decoder_start_token_id),
            "decoder_attention_mask": decoder_attention_mask(labels),
            "labels": labels,
        }


class PackedCollator(Collator):
    """Examples -> one packed row (TrainConfig.pack): the sources one after the other, the targets likewise, each
    target shifted right on its own (its start token first), and the pairs' lengths. No padding at all; the model
    side (finetune/models/packing.py) keeps attention and positions within each pair."""

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PackedCollator: no examples to pack")
        sources = [torch.as_tensor(e.input_ids, dtype=torch.long) for e in examples]
        labels = [torch.as_tensor(e.labels, dtype=torch.long) for e in examples]
        empty = [i for i, (s, t) in enumerate(zip(sources, labels)) if len(s) == 0 or len(t) == 0]
        if empty:
            raise ValueError(f"PackedCollator: example {empty[0]} of the batch has an empty source or target")
        shifted = [shift_tokens_right(t[None], self.pad_token_id, self.decoder_start_token_id)[0] for t in labels]
        return {
            "input_ids": torch.cat(sources)[None],
            "decoder_input_ids": torch.cat(shifted)[None],
            "labels": torch.cat(labels)[None],
            "source_lengths": torch.tensor([len(s) for s in sources]),
            "target_lengths": torch.tensor([len(t) for t in labels]),
        }
