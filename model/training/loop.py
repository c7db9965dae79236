"""The training loop shared by every objective: AdamW, warm-up + cosine learning rate, gradient
accumulation and clipping, an EMA copy, bf16 autocast, DDP, CSV metrics, checkpoints and resume.

An objective is anything with `loss(net, batch, step) -> (scalar, {name: float})`; `net` is the module
being trained (DDP-wrapped when several processes run). One step reads one global batch of windows:
world_size * accumulation * micro_batch of them, each process its own slice (see `WindowSet.batch`).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..checkpoint_file import write_safetensors

log = logging.getLogger(__name__)
STATE_NAME = "train_state.pt"


class Batch(Protocol):
    def to(self, device: torch.device | str, dtype: torch.dtype = ...) -> Any: ...


class Batches(Protocol):
    """Where a step's examples come from (`WindowSet`, `autoencoder.FramePairs`): positions first ..
    first + count - 1 of step `step`'s global batch, the same whatever the split over processes."""

    def batch(self, step: int, global_batch: int, first: int, count: int) -> Batch: ...


class Objective(Protocol):
    def loss(self, net: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass(frozen=True)
class LoopSettings:
    steps: int = 10_000
    micro_batch: int = 8  # windows per process per forward pass
    accumulation: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    # Parameter-name prefix -> learning-rate multiplier (e.g. {"enc.fc.": 10}); the rest use lr.
    lr_scale: dict[str, float] = field(default_factory=dict)
    warmup: int = 500
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = False  # autocast the forward in bf16 (weights, optimiser and EMA stay fp32)
    log_every: int = 10
    save_every: int = 1000
    seed: int = 0
    progress: bool = True


def learning_rate(step: int, s: LoopSettings) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    span = max(1, s.steps - s.warmup)
    progress = min(1.0, (step - s.warmup) / span)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def parameter_groups(named: list[tuple[str, nn.Parameter]], lr_scale: dict[str, float]) -> list[dict]:
    """One optimiser group per learning-rate multiplier; the first matching prefix of `lr_scale` wins."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in named:
        scale = next((v for prefix, v in lr_scale.items() if name.startswith(prefix)), 1.0)
        groups.setdefault(scale, []).append(param)
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


class EMA:
    """Exponential moving average of a module's parameters (buffers copied as they are)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for avg, p in zip(self.module.parameters(), module.parameters(), strict=False):
            avg.lerp_(p.detach(), 1 - self.decay)


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_environment(device: torch.device) -> Distributed:
        """torchrun sets WORLD_SIZE / RANK; one process otherwise. gloo on CPU, nccl on CUDA."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return Distributed()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Distributed(dist.get_rank(), dist.get_world_size())


class Trainer:
    """Runs `settings.steps` steps of `objective` on `module`'s parameters, writing into `out_dir`:
    metrics.csv, train_state.pt (resume) and, through `export`, the model checkpoint."""

    def __init__(self, module: nn.Module, objective: Objective, windows: Batches, settings: LoopSettings,
                 out_dir: str | Path, export: Callable[[nn.Module, Path], None], device: torch.device,
                 dist_info: Distributed | None = None):
        self.module = module.to(device).train()
        self.objective = objective
        self.windows = windows
        self.s = settings
        self.out = Path(out_dir)
        self.export = export
        self.device = device
        self.dist = dist_info or Distributed()
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        if not self.params:
            raise ValueError("nothing to train: the module has no parameter that requires grad")
        self.optimizer = torch.optim.AdamW(parameter_groups(named, settings.lr_scale), lr=settings.lr,
                                           betas=settings.betas, weight_decay=settings.weight_decay)
        self.ema = EMA(module, settings.ema_decay)
        self.net: nn.Module = module
        if self.dist.active:
            ids = [device] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.step = 0

    @property
    def global_batch(self) -> int:
        return self.dist.world * self.s.accumulation * self.s.micro_batch

    # -- checkpoints ----------------------------------------------------------------------------------------

    def save(self) -> None:
        if not self.dist.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "module": self.module.state_dict(), "ema": self.ema.module.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "settings": asdict(self.s)}
        tmp = self.out / (STATE_NAME + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.out / STATE_NAME)  # a crash mid-write leaves the previous state usable
        self.export(self.ema.module, self.out)

    def resume(self) -> bool:
        """Continue from out_dir's train_state.pt if there is one; returns whether it did."""
        path = self.out / STATE_NAME
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        log.info("resumed %s at step %d", path, self.step)
        return True

    # -- steps ----------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        s = self.s
        lr = learning_rate(self.step, s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for k in range(s.accumulation):
            first = (k * self.dist.world + self.dist.rank) * s.micro_batch
            batch = self.windows.batch(self.step, self.global_batch, first, s.micro_batch).to(self.device)
            last = k == s.accumulation - 1
            # DDP averages gradients over processes; only the last micro-batch needs to synchronise.
            sync = (self.net.no_sync() if isinstance(self.net, nn.parallel.DistributedDataParallel) and not last
                    else contextlib.nullcontext())
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=s.bf16):
                    loss, metrics = self.objective.loss(self.net, batch, self.step)
                (loss / s.accumulation).backward()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / s.accumulation
        norm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        self.optimizer.step()
        self.ema.update(self.module)
        self.step += 1
        if self.dist.active:  # report the mean over processes
            keys = sorted(totals)
            values = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(values)
            totals = {k: float(v) / self.dist.world for k, v in zip(keys, values, strict=False)}
        return {**totals, "grad_norm": float(norm), "lr": lr}

    def run(self, until: int | None = None) -> list[dict[str, float]]:
        """Train up to step `until` (default: the last); checkpoints every save_every steps and at the end."""
        s = self.s
        until = s.steps if until is None else min(until, s.steps)
        self.out.mkdir(parents=True, exist_ok=True)
        history = []
        csv_path = self.out / "metrics.csv"
        writer = None
        fh = None
        bar = tqdm(total=s.steps, initial=self.step, desc="train", unit="step",
                   disable=not (s.progress and self.dist.main))
        t_last, windows = time.perf_counter(), 0
        try:
            while self.step < until:
                metrics = self.train_step()
                windows += self.global_batch
                if self.step % s.log_every == 0 or self.step == s.steps:
                    elapsed = time.perf_counter() - t_last
                    row = {"step": self.step, **metrics, "windows_per_s": windows / max(elapsed, 1e-9)}
                    t_last, windows = time.perf_counter(), 0
                    history.append(row)
                    if self.dist.main:
                        if writer is None:
                            _set_aside_other_columns(csv_path, list(row), self.step)
                            fh = open(csv_path, "a", newline="")  # noqa: SIM115 (kept open for the run)
                            writer = csv.DictWriter(fh, fieldnames=list(row))
                            if fh.tell() == 0:
                                writer.writeheader()
                        writer.writerow(row)
                        fh.flush()  # type: ignore[union-attr]  # opened together with the writer
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", win_s=f"{row['windows_per_s']:.1f}")
                bar.update(1)
                if self.step % s.save_every == 0 or self.step == until:
                    self.save()
        finally:
            bar.close()
            if fh is not None:
                fh.close()
        return history


def export_safetensors(state_dict_of: Callable[[nn.Module], dict[str, torch.Tensor]], name: str
                       ) -> Callable[[nn.Module, Path], None]:
    """An export hook writing `state_dict_of(ema_module)` to out_dir/name as safetensors."""

    def export(ema_module: nn.Module, out: Path) -> None:
        tensors = {k: v.contiguous().cpu() for k, v in state_dict_of(ema_module).items()}
        write_safetensors(tensors, out / name, metadata={"format": "pt", "producer": "avatar-forcing train"})

    return export


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str))


def _set_aside_other_columns(path: Path, fields: list[str], step: int) -> None:
    """A resumed run whose metrics have other columns (an objective term added or dropped) starts a new
    metrics.csv; the earlier rows stay readable as metrics-before-STEP.csv."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    if header != fields:
        path.replace(path.with_name(f"{path.stem}-before-{step}{path.suffix}"))
