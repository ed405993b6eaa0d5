"""bert2bert's cross-attention start: random (Rothe et al.) or a copy of each layer's self-attention."""
import pytest
import torch

from finetune.models import bert2bert_by_name


def test_cross_attention_can_start_as_a_copy_of_self_attention():
    model = bert2bert_by_name("tiny", cross_init="self").model
    for layer in model.decoder.bert.encoder.layer:
        own = dict(layer.attention.named_parameters())
        for name, tensor in layer.crossattention.named_parameters():
            assert torch.equal(tensor, own[name]) and tensor.data_ptr() != own[name].data_ptr(), name
    randomly = bert2bert_by_name("tiny").model.decoder.bert.encoder.layer[0]
    assert not torch.equal(randomly.crossattention.self.query.weight, randomly.attention.self.query.weight)


def test_a_bad_cross_init_is_refused(tmp_path):
    from finetune.models.bert2bert import bert2bert

    with pytest.raises(ValueError, match="cross_init must be one of"):
        bert2bert(str(tmp_path), cross_init="copy")
    for seed in ("0", 1.5, True, -1):
        with pytest.raises(ValueError, match="seed must be None or an int"):
            bert2bert(str(tmp_path), seed=seed)
        with pytest.raises(ValueError, match="seed must be None or an int"):
            bert2bert_by_name("tiny", seed=seed)


def test_the_warm_start_new_tensors_follow_the_seed_and_leave_the_global_random_state():
    from finetune.models import bert2bert, minilm_path

    state = torch.random.get_rng_state()
    first, again, other = (bert2bert(minilm_path(), seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.new_parameters == again.new_parameters and first.new_parameters
    params = [dict(b.model.named_parameters(remove_duplicate=False)) for b in (first, again, other)]
    for name in first.new_parameters:
        assert torch.equal(params[0][name], params[1][name]), name
    query = "decoder.bert.encoder.layer.0.crossattention.self.query.weight"
    assert query in first.new_parameters and not torch.equal(params[0][query], params[2][query])
    pretrained = "encoder.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(params[0][pretrained], params[2][pretrained])  # the checkpoint's own tensors: whatever the seed
