"""The learning rate of every optimizer step: batch-size scaling, warm-up, then constant, cosine or step.

    drgn train ... --lr-schedule cosine --warmup-epochs 1 --lr-final 0.1
    drgn train ... --batch-size 64 --lr-scale sqrt          # lr 1e-4 · sqrt(64 / 8)

Why a pure function of the step. The rate of global step g (counted from the first batch of the first epoch)
is computed from the run's settings and g alone, never from a running scheduler object. The checkpoint
already holds where training stands (epoch, batch), so a run killed and resumed sets exactly the rates an
uninterrupted one does, and the schedule's record (`LrSchedule.record`) in the checkpoint and config.yaml
is all the state there is (docs/architecture.md § Learning-rate schedule and training subset).

Defaults are the paper's: Adam at a constant 1e-4 for batch 8, no warm-up, no scaling (cryoDRGN has no
schedule). The options exist to be measured (bench/README.md, "Learning-rate schedule, batch scaling,
training subset"); none is a default.

- warm-up: linear from base/W to base over the first W steps (W = round(--warmup-epochs × steps per
  epoch)), so the first step already moves (Goyal et al. 2017's gradual warm-up).
- cosine: from base at the end of the warm-up to base·final at the end of the decay horizon, half a cosine.
- step: `drops` equal geometric drops spread evenly over the decay phase, the last one reaching base·final
  (final 0.01 with 2 drops: ×0.1 after a third of it, ×0.01 after two thirds).
- after the horizon (a run resumed with more epochs than it started with) the rate stays at its final value.
- batch scaling: base = lr·(B / B_ref)^p with p = ½ (sqrt, Adam's usual rule) or 1 (linear, SGD's rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from drgn_core.errors import DrgnError

SCHEDULES = ("constant", "cosine", "step")
LR_SCALES = ("none", "sqrt", "linear")


def scaled_lr(lr: float, batch_size: int, ref_batch: int, rule: str) -> float:
    """The base rate for `batch_size` when `lr` is the rate that suits `ref_batch` under `rule`.

    'none' returns `lr` itself (the same float, so a default run is unchanged bit for bit)."""
    if rule == "none":
        return lr
    if rule not in LR_SCALES:
        raise DrgnError(f"--lr-scale must be one of {', '.join(LR_SCALES)}, got {rule!r}")
    if ref_batch < 1:
        raise DrgnError(f"--lr-ref-batch must be >= 1, got {ref_batch}")
    power = 0.5 if rule == "sqrt" else 1.0
    return lr * (batch_size / ref_batch) ** power


@dataclass(frozen=True)
class LrSchedule:
    """The rate of every global step of one run (see the module docstring for the formulas)."""

    base: float              # peak rate, after batch scaling
    kind: str = "constant"   # constant | cosine | step
    warmup_steps: int = 0
    total_steps: int = 1     # the decay horizon in steps, warm-up included
    final: float = 1.0       # rate at the end of the horizon, as a fraction of `base` (cosine, step)
    drops: int = 2           # step: number of drops

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise DrgnError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        if not 0.0 < self.final <= 1.0:
            raise DrgnError(f"--lr-final must be in (0, 1], got {self.final}")
        if self.drops < 1:
            raise DrgnError(f"--lr-drops must be >= 1, got {self.drops}")
        if self.warmup_steps < 0:
            raise DrgnError(f"--warmup-epochs must be >= 0, got {self.warmup_steps} steps")

    def lr(self, step: int) -> float:
        """The learning rate of global step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.base * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min((step - self.warmup_steps) / span, 1.0)   # progress through the decay phase, 0 → 1
        if self.kind == "cosine":
            return self.base * (self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * t)))
        k = min(math.floor(t * (self.drops + 1)), self.drops)   # drops passed so far
        return self.base * self.final ** (k / self.drops)

    def record(self) -> dict:
        """What config.yaml and the checkpoint keep: the schedule in plain numbers."""
        return {"kind": self.kind, "base_lr": float(self.base), "warmup_steps": int(self.warmup_steps),
                "total_steps": int(self.total_steps), "final_fraction": float(self.final),
                "drops": int(self.drops), "final_lr": float(self.lr(self.total_steps))}


def schedule_for(lr: float, batch_size: int, steps_per_epoch: int, *, kind: str = "constant",
                 warmup_epochs: float = 0.0, final: float = 0.1, drops: int = 2, scale: str = "none",
                 ref_batch: int = 8, horizon_epochs: int = 1) -> LrSchedule:
    """The schedule of a run with these settings; `horizon_epochs` epochs of `steps_per_epoch` steps."""
    if warmup_epochs < 0:
        raise DrgnError(f"--warmup-epochs must be >= 0, got {warmup_epochs}")
    if horizon_epochs < 1:
        raise DrgnError(f"--lr-decay-epochs must be >= 1, got {horizon_epochs}")
    base = scaled_lr(lr, batch_size, ref_batch, scale)
    warm = round(warmup_epochs * steps_per_epoch)
    return LrSchedule(base=base, kind=kind, warmup_steps=warm, total_steps=horizon_epochs * steps_per_epoch,
                      final=final if kind != "constant" else 1.0, drops=drops)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of `opt` the rate `lr` (Adam's moments are untouched)."""
    for group in opt.param_groups:
        group["lr"] = lr
