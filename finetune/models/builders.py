"""Models built from configs, with random weights, offline: tiny ones for tests and smoke runs, base-sized ones
for benchmarks, and a character-level tokenizer for them. One builder a family (finetune/families.py names it).
"""
from __future__ import annotations

import string

import torch

CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " "
SPECIALS = {
    "bart": dict(pad="<pad>", bos="<s>", eos="</s>", unk="<unk>", mask="<mask>"),
    "t5": dict(pad="<pad>", eos="</s>", unk="<unk>"),
    "bert": dict(pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]"),
}


def char_tokenizer(style: str = "bart"):
    """A character-level fast tokenizer whose special tokens follow BART, T5 or BERT conventions.

    bart: `<s> text </s>`; t5: `text </s>`; bert: `[CLS] text [SEP]`. Pad is id 0 in every style.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if style not in SPECIALS:
        raise ValueError(f"char_tokenizer: style must be one of {sorted(SPECIALS)}, got {style!r}")
    special = SPECIALS[style]
    vocab = {tok: i for i, tok in enumerate(list(special.values()) + list(CHARACTERS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    first, last = {"bart": ("bos", "eos"), "t5": (None, "eos"), "bert": ("cls", "sep")}[style]
    template = " ".join(t for t in (first and special[first], "$A", special[last]) if t)
    used = [special[k] for k in (first, last) if k]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in used])
    names = {"pad": "pad_token", "bos": "bos_token", "eos": "eos_token", "unk": "unk_token",
             "mask": "mask_token", "cls": "cls_token", "sep": "sep_token"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{names[k]: v for k, v in special.items()})


def tiny_bart(tokenizer=None, d_model: int = 32, layers: int = 1, seed: int = 0):
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = tokenizer or char_tokenizer("bart")
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    return BartForConditionalGeneration(config), tokenizer


def tiny_t5(tokenizer=None, d_model: int = 32, layers: int = 1, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = tokenizer or char_tokenizer("t5")
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model, num_layers=layers,
        num_heads=2, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config), tokenizer


def tiny_bert2bert(tokenizer=None, hidden: int = 32, layers: int = 1, seed: int = 0):
    from transformers import BertConfig, BertLMHeadModel, BertModel, EncoderDecoderModel

    tokenizer = tokenizer or char_tokenizer("bert")
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=2 * hidden, max_position_embeddings=128, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id)
    encoder = BertModel(BertConfig(**common), add_pooling_layer=False)
    decoder = BertLMHeadModel(BertConfig(**common, is_decoder=True, add_cross_attention=True))
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = tokenizer.cls_token_id
    model.config.eos_token_id = tokenizer.sep_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def base_sized(name: str):
    """(model, tokenizer) at the published sizes of bart-base (139M) or t5-base (223M), random weights and the
    character tokenizer, for speed and memory benchmarks."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    if name == "bart-base":
        tok = char_tokenizer("bart")
        config = BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                            encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                            decoder_ffn_dim=3072, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
                            forced_eos_token_id=tok.eos_token_id)
        return BartForConditionalGeneration(config), tok
    if name == "t5-base":
        tok = char_tokenizer("t5")
        config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          decoder_start_token_id=tok.pad_token_id)
        return T5ForConditionalGeneration(config), tok
    raise ValueError(f"base_sized: unknown model {name!r} (bart-base or t5-base)")
