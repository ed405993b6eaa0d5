import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from finetune.models import tiny_bart, tiny_bert2bert, tiny_t5  # noqa: E402

BUILDERS = {"bart": tiny_bart, "t5": tiny_t5, "bert2bert": tiny_bert2bert}

SPELLING = [("teh cat", "the cat"), ("recieve", "receive"), ("adress", "address"), ("wich", "which"),
            ("occured", "occurred"), ("seperate", "separate")]


@pytest.fixture(params=sorted(BUILDERS))
def family(request):
    return request.param


def build(family, **kwargs):
    return BUILDERS[family](**kwargs)
