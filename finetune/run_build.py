"""From a parsed run file (finetune.run_config) to what the engine needs: the model with its method applied, the
TrainConfig, the data. The one path the `finetune` command and the examples share."""
from __future__ import annotations

from dataclasses import dataclass

from finetune.data.noise import NoiseConfig
from finetune.run_config import ModelSection, RunConfig
from finetune.train.config import TrainConfig


def tiny_models() -> dict[str, str]:
    """'tiny-bart' -> 'tiny_bart': the families' tiny builders (finetune/families.py) by their run-file name."""
    from finetune.families import FAMILIES

    return {f.tiny.replace("_", "-"): f.tiny for f in FAMILIES.values() if f.tiny}


def build_model(section: ModelSection, method=None, seed: int | None = None):
    """(model, tokenizer, newly initialised parameter names) for a [model] section. A [method] that quantises its
    base (int8-lora, qlora) on a local model folder quantises it while it loads (finetune.models.streamed). `seed`:
    where the new tensors of a warm start draw their random start."""
    import os

    from finetune import models
    from finetune.methods.registry import method as method_named

    tiny = tiny_models()
    if section.name in tiny:
        print(f"model {section.name}: a small RANDOMLY INITIALISED model with a character tokenizer")
        model, tokenizer = getattr(models, tiny[section.name])()
        return model, tokenizer, []
    if section.name == "minilm" or section.bert2bert:
        built = models.bert2bert_by_name(section.name, seed=seed)
        return built.model, built.tokenizer, built.new_parameters
    declared = method_named(method.name) if method is not None else None
    loftq = declared is not None and declared.resolve(method.settings).get("lora_init") == "loftq"
    if declared is not None and declared.quantizer and not loftq and os.path.isdir(section.name):  # LoftQ: in float
        model, tokenizer = models.load_quantized(section.name, method.name, **method.settings)
        return model, tokenizer, []
    model, tokenizer = models.load_seq2seq(section.name)
    return model, tokenizer, []


def load_data(spec: str | None, limit: int | None, seed: int, source_field: str, target_field: str):
    """A [data] entry: a file or folder path, "hf:PATH" (a datasets.save_to_disk folder), `codespell:SPLIT` or
    `code-summary:SPLIT` (the real data built offline: finetune.data.builtin); `limit` takes the first n (the real data:
    a seeded sample). A path without a limit is passed on as it is: the engine reads and caches it
    (finetune.data.corpus)."""
    from finetune.data.pairs import read_pairs

    if spec is None:
        return None
    if spec.startswith("codespell:"):
        from finetune.data.builtin import codespell_pairs

        return codespell_pairs(spec.split(":", 1)[1], limit=limit, seed=seed)
    if spec.startswith("code-summary:"):
        from finetune.data.builtin import code_summary_pairs

        return code_summary_pairs(spec.split(":", 1)[1], limit=limit, seed=seed)
    if not limit:
        from finetune.data.sources import open_source

        open_source(spec, "[data]")  # a missing file or unknown format fails here; the engine reads it (cached)
        return spec
    return read_pairs(spec, source_field, target_field)[:limit]


@dataclass
class BuiltRun:
    model: object
    tokenizer: object
    new_parameters: list[str]
    config: TrainConfig
    train: list
    eval: list | None
    noise: NoiseConfig | None


def build_run(run: RunConfig) -> BuiltRun:
    """The model with its method applied (and [method] freeze / unfreeze), the TrainConfig with the new tensors'
    learning rate ([model] new_lr), and the data."""
    from finetune.methods.freeze import freeze, unfreeze
    from finetune.methods.registry import apply_method, new_tensor_lr

    model, tokenizer, new = build_model(run.model, run.method, seed=run.train.seed)
    if run.model.dropout is not None:
        from finetune.models.adjust import set_dropout

        set_dropout(model, run.model.dropout)
    apply_method(model, run.method.name, new, **run.method.settings)
    if run.method.freeze:
        freeze(model, run.method.freeze)
    if run.method.unfreeze:
        unfreeze(model, run.method.unfreeze)
    cfg = run.train
    cfg.lr_overrides = {**new_tensor_lr(new, run.model.new_lr), **cfg.lr_overrides}
    train = load_data(run.data.train, run.data.train_limit, cfg.seed, cfg.source_field, cfg.target_field)
    evaluation = load_data(run.data.eval, run.data.eval_limit, cfg.seed, cfg.source_field, cfg.target_field)
    return BuiltRun(model, tokenizer, new, cfg, train, evaluation, run.noise)


def check_setup(model, tokenizer, config, train, new_parameters=(), steps: int = 200, eval=None,
                resume: bool = False):
    """Build the engine (its special-token contract is the first check) and run `check` on it; for a fresh run
    (not `resume`), also the output folder as `finetune train` will claim it."""
    from finetune.store.outputs import OutputDirError, claim_for_fresh_run
    from finetune.train.engine import Engine
    from finetune.train.preflight import CheckReport, check

    try:
        engine = Engine(model, tokenizer, config)
    except ValueError as err:
        report = CheckReport()
        report.add("FAIL", "special tokens" if "token" in str(err) else "setup", str(err))
        return report
    report = check(engine, train, new_parameters, steps, eval)
    if not resume:
        try:
            replaced = claim_for_fresh_run(config.output_dir, config.overwrite_output_dir, dry_run=True)
            report.add("WARN" if replaced else "PASS", "output folder",
                       f"{config.output_dir}: " + (f"overwrite_output_dir replaces {', '.join(replaced)}" if replaced
                                                    else "free for a fresh run"))
        except OutputDirError as err:
            report.add("FAIL", "output folder", f"{err} (or check with --resume)")
    return report
