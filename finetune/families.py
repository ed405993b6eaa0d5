"""One row per model family: everything the engine does differently for BART, T5, bert2bert, ...

Every module reads this table instead of its own `if model_type == ...`. Adding a family is one row here
(plus a tiny builder in finetune/models/builders.py for its tests). The fields:

    lora_targets      regexes of the linear layers LoRA wraps by default (the query and value projections,
                      as people use LoRA: Hu et al., 2021, §7.1; PEFT's defaults)
    adam              (betas, eps) of the family's pretraining recipe where it used Adam:
                      BART (Lewis et al., 2020, §5) follows RoBERTa (Liu et al., 2019, Table 9): (0.9, 0.98), 1e-6;
                      BERT (Devlin et al., 2019, App. A.2): (0.9, 0.999), 1e-6; Marian (Transformer base,
                      Vaswani et al., 2017, §5.3): (0.9, 0.98), 1e-9; T5 / Pegasus were pretrained with
                      Adafactor and get torch's AdamW defaults (0.9, 0.999), 1e-8
    optimizer         the optimizer of the family's recipe when TrainConfig.optimizer is None: "adafactor" for
                      T5 (pretrained and fine-tuned with it: Raffel et al., 2020, §3.1.2 and §3.1.3), else "adamw"
    encoder           regex of the encoder's parameter names (the `frozen-encoder` method)
    starts_from_pad   decoding starts from the pad token when the config names no start token (T5)
    fp16_safe         False where activations overflow float16 (T5's feed-forward outputs)
    logits_bias       name of a (1, vocabulary) buffer the model adds to the output layer's logits, which
                      the fused loss adds itself (BART's `final_logits_bias`); None if there is none
    head_is_last      True where the logits are the output layer's (+ logits_bias) and nothing after it;
                      for a family not in this table the engine checks that on the first batch
    unused_pooler     the encoder keeps BERT's pooler, which no seq2seq forward reads (bert2bert): it is
                      frozen, and dropped when a saved model is reloaded
    positions         how the model knows where a token is: "learned" absolute position embeddings (BART, BERT),
                      "relative" attention bias (T5); packed batches (TrainConfig.pack, finetune/models/packing.py)
                      restart them in every pair, and are refused for a family where this is "" (not described)
    tiny              name of the builder in finetune.models of a small random model for tests and smoke runs
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    lora_targets: tuple[str, ...] = ()
    adam: tuple[tuple[float, float], float] = ((0.9, 0.999), 1e-8)
    encoder: str = r"^encoder\."
    starts_from_pad: bool = False
    fp16_safe: bool = True
    logits_bias: str | None = None
    head_is_last: bool = False
    tiny: str | None = None
    optimizer: str = "adamw"
    unused_pooler: bool = False
    positions: str = ""


BART_TARGETS = (r"\.(q_proj|v_proj)$",)
T5_TARGETS = (r"\.(q|v)$",)
BERT_TARGETS = (r"\.(query|value)$",)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("bart", BART_TARGETS, ((0.9, 0.98), 1e-6), r"^model\.encoder\.", logits_bias="final_logits_bias",
           head_is_last=True, tiny="tiny_bart", positions="learned"),
    Family("mbart", BART_TARGETS, ((0.9, 0.98), 1e-6), r"^model\.encoder\.", logits_bias="final_logits_bias",
           head_is_last=True),
    Family("marian", BART_TARGETS, ((0.9, 0.98), 1e-9), r"^model\.encoder\.", logits_bias="final_logits_bias",
           head_is_last=True),
    Family("pegasus", BART_TARGETS, ((0.9, 0.999), 1e-8), r"^model\.encoder\.", logits_bias="final_logits_bias",
           head_is_last=True),
    Family("t5", T5_TARGETS, optimizer="adafactor", starts_from_pad=True, fp16_safe=False, head_is_last=True,
           tiny="tiny_t5", positions="relative"),
    Family("mt5", T5_TARGETS, optimizer="adafactor", starts_from_pad=True, fp16_safe=False, head_is_last=True,
           positions="relative"),
    Family("umt5", T5_TARGETS, optimizer="adafactor", starts_from_pad=True, fp16_safe=False, head_is_last=True),
    Family("longt5", T5_TARGETS, optimizer="adafactor", starts_from_pad=True, fp16_safe=False, head_is_last=True),
    # bert2bert: transformers' EncoderDecoderModel around BERT encoder and decoder
    Family("encoder-decoder", BERT_TARGETS, ((0.9, 0.999), 1e-6), head_is_last=True, tiny="tiny_bert2bert",
           unused_pooler=True, positions="learned"),
    Family("bert", BERT_TARGETS, ((0.9, 0.999), 1e-6), positions="learned"),
)}


def family_of(model: nn.Module) -> Family:
    """The model's row; a family not in the table gets the defaults (and no default LoRA targets)."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    return FAMILIES.get(model_type, Family(model_type))
