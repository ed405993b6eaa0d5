import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import finetune  # noqa: E402
from finetune.models import tiny_bart, tiny_bert2bert, tiny_t5  # noqa: E402

RUN_DATA = [(f"teh wrod {i}", f"the word {i}") for i in range(16)]
RUN_EVAL = [(f"wrod {i}", f"word {i}") for i in range(6)]


def short_run(out, **kw):
    """8 steps of 4 pairs with an evaluation every 2: the short run with validation many tests use."""
    base = dict(lr=3e-3, batch_size=4, max_steps=8, eval_every=2, progress=False, output_dir=str(out), log_every=1,
                precision="fp32")
    return finetune.TrainConfig(**{**base, **kw})


def spoil_after(step):
    """An on_step hook that adds noise to every weight after `step`: later evaluations get worse."""
    def hook(engine, stats):
        if engine.global_step >= step:
            with torch.no_grad():
                for p in engine.model.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(engine.global_step)) * 0.5)
    return hook


BUILDERS = {"bart": tiny_bart, "t5": tiny_t5, "bert2bert": tiny_bert2bert}

SPELLING = [("teh cat", "the cat"), ("recieve", "receive"), ("adress", "address"), ("wich", "which"),
            ("occured", "occurred"), ("seperate", "separate")]


@pytest.fixture(params=sorted(BUILDERS))
def family(request):
    return request.param


def build(family, **kwargs):
    return BUILDERS[family](**kwargs)


@pytest.fixture(autouse=True)
def auto_precision_is_fp32(request, monkeypatch):
    """Tests compare numbers at fp32 tolerances, so `precision="auto"` (the default) resolves to fp32 in them on
    every CPU; a test of `auto` itself is marked `real_auto_precision`."""
    if "real_auto_precision" in request.keywords:
        return
    import finetune.train.precision

    monkeypatch.setattr(finetune.train.precision, "choose", lambda device: ("fp32", "tests pin auto to fp32"))


@pytest.fixture(autouse=True)
def data_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Tokenised-data caches (finetune.data.corpus) of a test run go to one temporary folder, never ~/.cache."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "finetune-cache"))
