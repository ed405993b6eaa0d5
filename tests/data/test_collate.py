"""shift_tokens_right and the masks, pinned to hand-computed tensors and to transformers' own shifts.

Pad and decoder-start ids are distinct sentinels (pad=7, start=5), so a mix-up of the two cannot pass.
"""
import pytest
import torch
from transformers.models.bart.modeling_bart import shift_tokens_right as bart_shift
from transformers.models.encoder_decoder.modeling_encoder_decoder import shift_tokens_right as encdec_shift

from finetune.data.collate import (IGNORE_INDEX, causal_mask, combine_masks, decoder_attention_mask, pad_inputs,
                                   pad_labels, padding_mask, shift_tokens_right, to_additive)
from finetune.models import tiny_t5

PAD, START = 7, 5
X = IGNORE_INDEX

CASES = {
    "plain": [[11, 12, 13, 2], [21, 22, 2, X]],
    "all padding row": [[11, 12, 2], [X, X, X]],
    "length one": [[2], [X]],
    "-100 in last position": [[11, 12, X], [21, 2, X]],
    "batch of one": [[31, 32, 33, 2]],
}


def t5_shift(labels):
    model, _ = tiny_t5()
    model.config.pad_token_id = PAD
    model.config.decoder_start_token_id = START
    return model._shift_right(labels)


def test_shift_by_hand():
    labels = torch.tensor([[11, 12, 13, 2], [21, 22, 2, X]])
    assert shift_tokens_right(labels, PAD, START).tolist() == [[START, 11, 12, 13], [START, 21, 22, 2]]
    labels = torch.tensor([[11, X, X]])
    assert shift_tokens_right(labels, PAD, START).tolist() == [[START, 11, PAD]]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("reference", [bart_shift, encdec_shift, "t5"])
def test_shift_parity_with_transformers(case, reference):
    labels = torch.tensor(CASES[case])
    ours = shift_tokens_right(labels, PAD, START)
    theirs = t5_shift(labels) if reference == "t5" else reference(labels, PAD, START)
    assert torch.equal(ours, theirs)
    assert (ours != X).all(), "no -100 may reach the decoder inputs"
    assert ours[:, 0].eq(START).all()


def test_shift_leaves_labels_untouched():
    labels = torch.tensor([[11, X]])
    shift_tokens_right(labels, PAD, START)
    assert labels.tolist() == [[11, X]]


def test_shift_refuses_missing_ids():
    with pytest.raises(ValueError, match="pad_token_id"):
        shift_tokens_right(torch.tensor([[1]]), None, START)
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        shift_tokens_right(torch.tensor([[1]]), PAD, None)
    with pytest.raises(ValueError, match="batch, length"):
        shift_tokens_right(torch.tensor([1, 2]), PAD, START)


def test_label_padding_is_minus_100_not_pad():
    labels = pad_labels([[1, 2, 3], [4]])
    assert labels.tolist() == [[1, 2, 3], [4, X, X]]


def test_pad_inputs():
    ids, mask = pad_inputs([[1, 2, 3], [4]], PAD)
    assert ids.tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_decoder_attention_mask_keeps_start_even_when_start_is_pad():
    # T5: the start token IS the pad id; a mask built from `!= pad` would hide it.
    labels = torch.tensor([[11, 2, X, X], [X, X, X, X]])
    assert decoder_attention_mask(labels).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    shifted = shift_tokens_right(labels, pad_token_id=0, decoder_start_token_id=0)
    assert (shifted != 0).long().tolist() != decoder_attention_mask(labels).tolist()


def test_causal_padding_combination():
    causal = causal_mask(3)
    assert causal.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    pad = padding_mask(torch.tensor([[1, 1, 0]]))
    combined = combine_masks(causal, pad)
    assert combined.shape == (1, 1, 3, 3)
    assert combined[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    additive = to_additive(combined)
    assert additive[0, 0, 0, 0] == 0 and additive[0, 0, 0, 1] == torch.finfo(torch.float32).min
