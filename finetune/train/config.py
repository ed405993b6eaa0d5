"""TrainConfig: every knob of a run in one dataclass, validated when it is made."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

from finetune.checks import check_table, describe, fits, is_finite_number, is_number, is_seed

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    # optimisation
    optimizer: str | None = None  # "adamw", "adafactor", "adamw8bit"; None: the family's recipe (T5: adafactor)
    lr: float | None = None  # None: the optimizer's recipe (AdamW 5e-5; T5's Adafactor 1e-3: finetune.train.optim)
    weight_decay: float = 0.01
    betas: tuple[float, float] | None = None  # None: the model family's pretraining recipe (finetune.train.optim)
    eps: float | None = None
    no_decay: list[str] = field(default_factory=list)  # regexes added to the 1-D no-decay rule
    lr_overrides: dict[str, float] = field(default_factory=dict)  # regex -> learning rate
    schedule: str | None = None  # "linear", "cosine", "constant"; None: the optimizer's recipe (AdamW linear,
    # T5's Adafactor constant)
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    max_grad_norm: float | None = 1.0
    label_smoothing: float = 0.0
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before the run stops
    # batches
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops early when set
    batch_size: int = 32
    max_tokens: int | None = None  # instead of batch_size: padded source + target tokens per micro-batch (per rank)
    grad_accum: int = 1
    group_by_length: bool = True
    pack: bool = False  # each micro-batch's pairs as one padding-free row, attention and positions kept within each
    # pair (finetune/models/packing.py): the same pairs, loss and gradients, no compute on padding
    prefetch: int = 2  # windows collated ahead by a background thread while the step runs (0: on the training thread)
    # data
    max_source_length: int = 128
    max_target_length: int = 128
    source_field: str = "source"
    target_field: str = "target"
    cache_data: bool = True  # files and datasets: tokenise once into an Arrow cache (finetune.data.corpus; needs pyarrow)
    cache_dir: str | None = None  # where: None = $FINETUNE_CACHE, else ~/.cache/finetune
    streaming: bool = False  # read and tokenise the training data as it goes (finetune.data.stream); needs max_steps
    stream_buffer: int = 10_000  # a stream's rows per buffer: length grouping and shuffling happen within one
    num_proc: int | None = None  # processes tokenising a file (None: every core this process may use)
    # numerics and memory
    precision: str = "auto"  # bf16 where the hardware has bf16 units (CUDA, CPU with AMX/AVX-512-BF16), else fp32
    grad_checkpointing: bool = False
    fused_loss: bool | None = None  # output layer + cross-entropy in blocks, no (tokens x vocabulary) logits in
    # memory; None: for micro-batches whose logits would be large (finetune/train/loss.py), the plain loss below
    # (both on target positions only); False: the plain loss on the model's own logits, padding included
    attention_fp32: bool | None = None  # under bf16 autocast on a CPU: attention of up to 256 keys in float32
    # (faster there: finetune/models/attention.py); None: on for CPUs with AVX-512-BF16 and no AMX (measured)
    device: str | None = None  # None: cuda when available, else cpu
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2 fully_shard)
    dist_timeout_s: int = 1800  # under torchrun: a collective waiting longer than this fails instead of hanging
    # evaluation
    eval_batch_size: int | None = None
    num_beams: int = 1
    max_new_tokens: int = 64
    # generation settings of transformers' GenerationConfig; None: the checkpoint's generation config decides
    # (e.g. a summarisation checkpoint's own length_penalty, or a forced first token such as mBART's language)
    length_penalty: float | None = None  # beam search: score / length**length_penalty (> 0 favours longer)
    early_stopping: bool | None = None  # beam search: stop when num_beams finished candidates exist
    no_repeat_ngram_size: int | None = None  # no n-gram of this size twice in an output (0: off)
    min_new_tokens: int | None = None  # eos is blocked until this many tokens are generated
    repetition_penalty: float | None = None  # > 1 discourages tokens already in the input or output (CTRL)
    eval_every: int | None = None  # optimizer steps; None: at the end of each epoch
    eval_max_samples: int | None = None  # evaluations during training use a fixed seeded subset of this size
    eval_num_beams: int = 1  # beams of the evaluations during training (greedy); the final one uses num_beams
    best_metric: str | None = None  # keep the best evaluation's weights (loss: lower is better; the rest higher)
    early_stopping_patience: int | None = None  # evaluations without improvement before the run ends
    early_stopping_threshold: float = 0.0  # an improvement must exceed this to count
    report_to: list[str] = field(default_factory=list)  # trackers: "tensorboard", "mlflow", "wandb" (finetune.train.recorder)
    # bookkeeping
    seed: int = 0
    output_dir: str = "runs/finetune"
    log_every: int = 10
    save_model: bool = True
    save_merged: bool = True  # model/ (the merged plain model); false: LoRA's adapter/ alone (it names its base)
    save_every: int | None = None  # optimizer steps between training-state checkpoints (also saved at the end)
    keep_last: int = 2  # checkpoints kept on disk
    overwrite_output_dir: bool = False  # a fresh run into a folder that holds another run's outputs replaces them
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        """Every field's type, then its range and how it fits the others: ValueError naming the field."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not fits(value, hints[f.name]):
                raise ValueError(f"TrainConfig.{f.name}={value!r}: expected {describe(hints[f.name])}, got "
                                 f"{type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"TrainConfig.{f.name}={value!r}: must be a finite number")
        self._check_optimisation()
        self._check_data()
        self._check_evaluation()
        self._check_run()

    def _need(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {what}")

    def _check_optimisation(self) -> None:
        need = self._need
        need(self.lr is None or self.lr > 0, "lr", "must be > 0 or None (the family's recipe)")
        from finetune.train.optim import OPTIMIZERS

        need(self.optimizer is None or self.optimizer in OPTIMIZERS, "optimizer",
             f"must be one of {', '.join(map(repr, OPTIMIZERS))} or None (the model family's recipe)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
        need(self.schedule is None or self.schedule in SCHEDULES, "schedule",
             f"must be one of {SCHEDULES} or None (the family's recipe)")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        need(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0 or None")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        need(self.betas is None or (len(self.betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in self.betas)),
             "betas", "must be two numbers in [0, 1)")
        need(self.eps is None or self.eps > 0, "eps", "must be > 0 or None")
        need(all(isinstance(p, str) for p in self.no_decay), "no_decay", "must be a list of regex strings")
        need(all(isinstance(k, str) for k in self.lr_overrides), "lr_overrides", "keys must be regex strings")
        need(all(is_finite_number(v) and v > 0 for v in self.lr_overrides.values()), "lr_overrides",
             "values must be finite learning rates > 0")
        from finetune.patterns import compile_patterns

        compile_patterns(self.no_decay, "TrainConfig.no_decay")
        compile_patterns(list(self.lr_overrides), "TrainConfig.lr_overrides")

    def _check_data(self) -> None:
        need = self._need
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or None")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.max_tokens is None or self.max_tokens >= self.max_source_length + self.max_target_length,
             "max_tokens", f"must hold one example of the longest kept lengths: >= max_source_length + "
             f"max_target_length = {self.max_source_length + self.max_target_length} (or None: batch_size)")
        need(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        need(self.prefetch >= 0, "prefetch", "must be >= 0 (0: collate on the training thread)")
        need(not (self.pack and self.fsdp), "pack", "packed batches are not tested under FSDP (fsdp=True); "
             "use DDP or pack=False")
        need(self.max_source_length >= 2, "max_source_length", "must be >= 2")
        need(self.max_target_length >= 2, "max_target_length", "must be >= 2")
        need(self.stream_buffer >= 1, "stream_buffer", "must be >= 1")
        if self.streaming:
            from finetune.data.stream import check_stream_settings

            check_stream_settings(self)
        need(self.num_proc is None or self.num_proc >= 1, "num_proc", "must be >= 1 or None (every core)")
        need(self.cache_dir is None or bool(self.cache_dir.strip()), "cache_dir", "must be a folder path or None")
        need(bool(self.source_field) and bool(self.target_field) and self.source_field != self.target_field,
             "target_field", f"source_field and target_field must be two different non-empty names "
             f"(source_field={self.source_field!r})")

    def _check_evaluation(self) -> None:
        need = self._need
        need(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1 or None")
        need(self.num_beams >= 1, "num_beams", "must be >= 1")
        need(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        need(self.eval_every is None or self.eval_every >= 1, "eval_every", "must be >= 1 or None")
        need(self.eval_max_samples is None or self.eval_max_samples >= 1, "eval_max_samples", "must be >= 1 or None")
        need(self.eval_num_beams >= 1, "eval_num_beams", "must be >= 1")
        from finetune.evaluate.generation import SETTINGS, check_settings

        check_settings({name: getattr(self, name) for name in SETTINGS}, max(self.num_beams, self.eval_num_beams),
                       self.max_new_tokens, "TrainConfig.")
        from finetune.evaluate.metrics import METRIC_DIRECTIONS

        need(self.best_metric is None or self.best_metric in METRIC_DIRECTIONS, "best_metric",
             f"must be one of {', '.join(METRIC_DIRECTIONS)} (or None)")
        need(self.early_stopping_patience is None or self.early_stopping_patience >= 1, "early_stopping_patience",
             "must be >= 1 or None")
        need(self.early_stopping_patience is None or self.best_metric is not None, "early_stopping_patience",
             "needs best_metric (the metric that must improve)")
        need(self.early_stopping_threshold >= 0, "early_stopping_threshold", "must be >= 0")

    def _check_run(self) -> None:
        need = self._need
        from finetune.train.recorder import SINKS

        need(all(r in SINKS for r in self.report_to), "report_to",
             f"known trackers: {', '.join(repr(n) for n in SINKS)}")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        need(self.save_every is None or self.save_every >= 1, "save_every", "must be >= 1 or None")
        need(self.keep_last >= 1, "keep_last", "must be >= 1")
        need(self.dist_timeout_s >= 1, "dist_timeout_s", "must be >= 1 (seconds)")
        need(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")
        need(is_seed(self.seed), "seed", "must be in [0, 2**63)")
        need(bool(self.output_dir.strip()), "output_dir", "must name a folder (it is empty)")
        need(self.device is None or self.device.split(":")[0] in ("cpu", "cuda", "mps", "xpu"), "device",
             "must be None, 'cpu', 'cuda' or 'cuda:N'")

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "TrainConfig":
        """Build from plain values (a TOML table); unknown keys and wrong types are errors naming the key."""
        check_table(values, typing.get_type_hints(cls), where)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
