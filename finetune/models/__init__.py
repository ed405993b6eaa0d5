"""Models: loading a checkpoint (`load_seq2seq`), assembling a bert2bert from BERT checkpoints, the special-token
contract, what is set on a model before it trains, and tiny / base-sized models built from configs."""
from finetune.models.adjust import enable_activation_checkpointing, freeze_unused_pooler, set_dropout
from finetune.models.attention import MAX_KEYS, use_float32_attention
from finetune.models.bert2bert import Bert2Bert, bert2bert, bert2bert_by_name, minilm_path
from finetune.models.builders import base_sized, char_tokenizer, tiny_bart, tiny_bert2bert, tiny_t5
from finetune.models.load import ModelNotAvailable, damaged_weights, load_seq2seq
from finetune.models.packing import enable_packing, packed_inputs
from finetune.models.streamed import load_quantized
from finetune.models.tokens import SpecialTokens, check_length, resolve_special_tokens

__all__ = ["load_seq2seq", "load_quantized", "damaged_weights", "ModelNotAvailable", "bert2bert", "bert2bert_by_name",
           "Bert2Bert", "minilm_path", "resolve_special_tokens", "SpecialTokens", "check_length",
           "enable_activation_checkpointing", "freeze_unused_pooler", "set_dropout", "use_float32_attention",
           "enable_packing", "packed_inputs",
           "MAX_KEYS", "base_sized", "char_tokenizer", "tiny_bart", "tiny_bert2bert", "tiny_t5"]
