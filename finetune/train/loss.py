"""The training loss: summed token cross-entropy, plain or fused with the output layer.

`token_loss` takes the model's logits. `head_loss` takes the hidden states that enter the output layer (`lm_head`)
and runs the layer on the target positions only (the padding's logits, which the loss ignores, are never made).
`fused_head_loss` takes the same hidden states and computes logits, cross-entropy and their gradients a block of
rows at a time, so the (target tokens x vocabulary) logits tensor, its float32 copy, its log-softmax and their
gradients — several times the size of all the decoder's activations for a 50k vocabulary — never exist at once. The
maths is the same: loss = logsumexp(z) - (1 - e) z_y - e mean(z) per target token (e = label smoothing, as
`F.cross_entropy` defines it), gradient softmax(z) - (1 - e) onehot(y) - e / V. tests/train/test_loss.py pins all
to `F.cross_entropy` on BART, T5 and bert2bert, with and without label smoothing, in fp32 and bf16.

`capture_hidden` gets those hidden states out of an unmodified `transformers` model: for one forward it puts
a stand-in where the output layer is, which records its input and returns a one-column placeholder, so the
model's own forward (and a DDP wrapper around it) runs as usual up to the head.

`TrainingLoss` is what the engine calls: one micro-batch in, (summed token loss, correct tokens) out. Where the
output layer is a plain `nn.Linear` (not LoRA, not int8) and the model is not sharded, the layer runs on the target
positions only: fused when asked for (by size by default), `head_loss` otherwise; else (and with fused_loss=False)
the model's own logits. For a model family the table (finetune/families.py) does not vouch for, it checks the loss
on the captured hidden states against the model's own logits on the first batch.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from finetune.data.collate import IGNORE_INDEX, is_packed
from finetune.families import family_of
from finetune.models.packing import packed_inputs

ROW_BLOCK_ELEMENTS = 1 << 23  # logits elements per block (32 MiB in float32): bounds the loss's extra memory
# fused_loss=None (the default) fuses a micro-batch whose logits would hold more elements than this (target tokens
# x vocabulary; 16 MiB in float32) and uses the plain loss below it, where the logits are small. Measured on the
# real job (MiniLM on codespell, ~576 target tokens x 30,522 = 17.6M elements a batch, fp32, one round of
# benchmarks/bench_real.py): fused full fine-tuning 118.9 samples/s at 1525 MiB peak against 121.9 at 1602 MiB
# plain; LoRA 191.3 at 1143 MiB against 172.7 at 1256 MiB. (In bf16 the plain loss was 7% faster for full
# fine-tuning, 240 vs 224 samples/s in benchmarks/profile_real.py, but holds the logits; memory decides.)
FUSE_ABOVE_ELEMENTS = 1 << 22
# Under bf16 / fp16 autocast with an output layer that trains, the fused loss measured worse on the real job (full
# fine-tuning, bf16, benchmarks/bench_real.py --precision bf16: fused 238 samples/s at 2031 MiB peak against plain
# 228 at 1636-1645 MiB; the cause of the fused path's extra memory there is not found): then it fuses only above
# 32M elements. With a frozen output layer (LoRA, BitFit, int8 + LoRA) the fused loss stays leaner under autocast
# too (LoRA 1175 MiB fused against 1260 plain), so the fp32 limit applies.
FUSE_ABOVE_ELEMENTS_AUTOCAST = 1 << 25


def token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0):
    """Summed cross-entropy over target tokens (labels != -100), in float32, and the count of correct tokens.

    The caller divides by the number of target tokens in the accumulation window.
    """
    flat_logits = logits.reshape(-1, logits.size(-1)).float()
    flat_labels = labels.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum",
                           label_smoothing=label_smoothing)
    valid = flat_labels != IGNORE_INDEX
    correct = (flat_logits.argmax(-1)[valid] == flat_labels[valid]).sum()
    return loss, correct


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T + bias + extra_bias, labels); gradients made block by block in forward.

    The loss is only ever scaled by a number before backward (1 / window tokens, the fp16 loss scale), so
    computing d(loss)/d(inputs) during forward and multiplying by the incoming scalar in backward is exact.
    Under autocast the matrix multiplies run in its dtype (as `nn.Linear` would); the softmax is float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, extra_bias, labels, label_smoothing, rows, need_grads):
        want = ctx.needs_input_grad[:3] if need_grads else (False, False, False)
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if want[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and want[2] else None
        autocast = torch.is_autocast_enabled(hidden.device.type)  # then matmuls cast their inputs themselves
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        vocab = weight.shape[0]
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start:start + rows], labels[start:start + rows]
            z = F.linear(h, weight, bias).float()
            if extra_bias is not None:
                z += extra_bias
            lse = torch.logsumexp(z, dim=-1)
            z_y = z.gather(1, y[:, None]).squeeze(1)
            row_loss = lse - (1 - label_smoothing) * z_y
            if label_smoothing:
                row_loss -= label_smoothing * z.mean(-1)
            loss += row_loss.sum()
            correct += (z.argmax(-1) == y).sum()
            if not any(want):
                continue
            g = z.sub_(lse[:, None]).exp_()  # d(loss)/dz = softmax(z) - (1 - e) onehot(y) - e / V, built in place
            g.scatter_add_(1, y[:, None], torch.full_like(z_y[:, None], label_smoothing - 1))
            if label_smoothing:
                g -= label_smoothing / vocab
            if grad_bias is not None:
                grad_bias += g.sum(0)
            if not autocast:
                g = g.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + rows] = g @ weight
            if grad_weight is not None:
                grad_weight += g.t() @ h
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        out = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*out, None, None, None, None, None)


def fused_head_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, label_smoothing: float = 0.0,
                    extra_bias: torch.Tensor | None = None, rows: int | None = None):
    """`token_loss(head(hidden) + extra_bias, labels)` without building the logits: (summed loss, correct count).

    hidden: (..., d) as it enters `head`; labels: (...) with -100 where there is no target. Only the target
    positions go through the head. `rows` per block defaults to ROW_BLOCK_ELEMENTS / vocabulary.
    """
    valid = labels != IGNORE_INDEX
    flat_hidden, flat_labels = hidden[valid], labels[valid]
    rows = rows or max(1, ROW_BLOCK_ELEMENTS // head.out_features)
    extra = extra_bias.reshape(-1).float() if extra_bias is not None else None
    return _FusedLinearCrossEntropy.apply(flat_hidden, head.weight, head.bias, extra, flat_labels,
                                          float(label_smoothing), rows, torch.is_grad_enabled())


def head_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, label_smoothing: float = 0.0,
              extra_bias: torch.Tensor | None = None):
    """`token_loss(head(hidden) + extra_bias, labels)` with the head run on the target positions only: the plain
    loss (autograd keeps these logits for backward) without the logits of the padding, which `token_loss` would
    ignore anyway. hidden: (..., d) as it enters `head`; labels: (...) with -100 where there is no target."""
    valid = labels != IGNORE_INDEX
    logits = head(hidden[valid])
    if extra_bias is not None:
        logits = logits + extra_bias.reshape(-1)
    return token_loss(logits, labels[valid], label_smoothing)


class _HiddenCapture(nn.Module):
    """Stands in for the output layer during one forward: keeps its input, returns a (..., 1) zero placeholder."""

    def __init__(self):
        super().__init__()
        self.hidden = None

    def forward(self, hidden):
        self.hidden = hidden
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], 1)


def fusable_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when the fused loss can stand in for it: a plain `nn.Linear` (not LoRA, not int8)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if type(head) is nn.Linear else None


@contextlib.contextmanager
def capture_hidden(model: nn.Module, head: nn.Linear, logits_bias: str | None = "final_logits_bias"):
    """For the forwards inside: `head` is replaced by a `_HiddenCapture` (yielded) and the logits-bias buffer
    (BART's `final_logits_bias`) by a (1, 1) zero, so the model builds no (tokens x vocabulary) tensor. Both are
    put back."""
    parent, name = next((m, n) for m in model.modules() for n, child in m.named_children() if child is head)
    capture = _HiddenCapture()
    bias = getattr(model, logits_bias, None) if logits_bias else None
    setattr(parent, name, capture)
    if bias is not None:
        setattr(model, logits_bias, torch.zeros(1, 1, dtype=bias.dtype, device=bias.device))
    try:
        yield capture
    finally:
        setattr(parent, name, head)
        if bias is not None:
            setattr(model, logits_bias, bias)


# What the model gets. The batch also holds `decoder_attention_mask`, but the decoder does not need it: with
# right padding, the causal mask already keeps every real position from seeing the pads after it, and the
# pads' own outputs are ignored by the loss (-100). Passing it only costs time (attention can no longer
# take its causal fast path); tests/train/test_engine.py checks that the logits at every target position agree.
MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids")


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments for a collated batch: MODEL_INPUTS, or a packed batch's block masks
    (finetune/models/packing.py)."""
    return packed_inputs(batch) if is_packed(batch) else {k: batch[k] for k in MODEL_INPUTS}


class TrainingLoss:
    """loss(model, batch) -> (summed token loss in float32, correct tokens), under the run's autocast.

    `model` is the engine's model or its DDP wrapper; `self.model` (unwrapped) is where the output layer is
    found. `fused` is the choice made for this model (see the module docstring); `reason` says why.
    """

    def __init__(self, model: nn.Module, precision, fused: bool | None = None, sharded: bool = False):
        self.model, self.precision = model, precision
        family = family_of(model)
        self.logits_bias = family.logits_bias
        head = fusable_head(model)
        self.by_size = fused is None
        if fused is False:
            self.head, self.reason = None, "plain loss (fused_loss=False)"
        elif sharded:
            self.head, self.reason = None, "plain loss (the model is sharded by FSDP)"
        elif head is None:
            self.head, self.reason = None, "plain loss (the output layer is not a plain nn.Linear: LoRA or int8)"
        else:
            self.head = head
            limit = FUSE_ABOVE_ELEMENTS_AUTOCAST if self._head_trains_under_autocast() else FUSE_ABOVE_ELEMENTS
            self.reason = (f"fused output layer + loss for micro-batches with more than {limit:,} logits, plain "
                           "below (the output layer on target positions only)" if self.by_size
                           else "fused output layer + loss")
        # the table vouches for transformers' own classes of a family: their logits come straight from the head
        self.checked = family.head_is_last and type(model).__module__.startswith("transformers.")

    @property
    def fused(self) -> bool:
        return self.head is not None

    def _head_trains_under_autocast(self) -> bool:
        return self.precision.dtype is not None and self.head is not None and self.head.weight.requires_grad

    def __call__(self, model, batch, label_smoothing: float = 0.0):
        limit = FUSE_ABOVE_ELEMENTS_AUTOCAST if self._head_trains_under_autocast() else FUSE_ABOVE_ELEMENTS
        fuse = self.head is not None and (
            not self.by_size or int((batch["labels"] != IGNORE_INDEX).sum()) * self.head.out_features > limit)
        if self.head is not None and not self.checked:
            self._check(batch)  # may drop the head: then the model's own logits below
        with self.precision.autocast():
            if self.head is not None:  # the output layer on target positions only, fused or plain
                return self._on_targets(model, batch, label_smoothing, fuse)
            logits = model(**model_inputs(batch)).logits
        return token_loss(logits, batch["labels"], label_smoothing)

    def _on_targets(self, model, batch, label_smoothing: float = 0.0, fuse: bool = True):
        with capture_hidden(self.model, self.head, self.logits_bias) as capture:
            model(**model_inputs(batch))
        extra_bias = getattr(self.model, self.logits_bias) if self.logits_bias else None
        loss = fused_head_loss if fuse else head_loss
        return loss(capture.hidden, self.head, batch["labels"], label_smoothing, extra_bias)

    def _check(self, batch) -> None:
        """First batch of a family the table does not know: the fused loss must equal the model's own logits'
        (eval mode, no gradients, no random numbers drawn, so an exact resume is untouched). A model that
        changes its logits after the output layer (scaling, capping) gets a warning and the plain loss."""
        self.checked = True
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self.precision.autocast():
            plain, _ = token_loss(self.model(**model_inputs(batch)).logits, batch["labels"])
            fused, _ = self._on_targets(self.model, batch)
        self.model.train(was_training)
        tolerance = 1e-4 if self.precision.dtype is None else 2e-2
        plain, fused = float(plain), float(fused)
        if abs(fused - plain) > tolerance * max(1.0, abs(plain)):
            warnings.warn(f"fused_loss: on the first batch the fused output layer + loss gives {fused:.6g} and the "
                          f"model's own logits give {plain:.6g}; this model changes its logits after the output "
                          "layer, so the engine uses the plain loss", stacklevel=3)
            self.head, self.reason = None, "plain loss (the model changes its logits after the output layer)"
