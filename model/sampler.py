"""Block-wise flow-matching sampling with three-branch classifier-free guidance (MODEL_SPEC §3).

A batch of B rows (sessions, or utterances) runs as 3B transformer rows, branch-major:
[unconditional | avatar audio only | user audio + user motion]. "Null" conditions are zeros of the projected
features, applied before the dual motion encoder; the reference motion r_s is kept in every branch. Each
branch keeps its own KV cache, but all are refreshed from the same guided latents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import FlowTransformerConfig, SamplerConfig
from .flow_transformer import FlowTransformer, LayerKV, apply_rope
from .scheduler import FlowMatchSchedule, SolverStep

NUM_BRANCHES = 3
NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]


@dataclass
class Conditions:
    """Per-frame conditions of B rows over the same frame span."""

    wa: torch.Tensor  # avatar audio features [B, L, dim_a]
    wa_user: torch.Tensor  # user audio features [B, L, dim_a]
    motion_user: torch.Tensor  # user motion latents [B, L, dim_w]

    def rows(self, row: int, start: int, stop: int) -> Conditions:
        """One row's frames [start, stop) as a batch of one."""
        return Conditions(*(x[row:row + 1, start:stop] for x in (self.wa, self.wa_user, self.motion_user)))

    def frames(self, start: int, stop: int) -> Conditions:
        """Frames [start, stop), replicate-padding past the end (the reference's rule)."""
        return Conditions(*(_slice_pad(x, start, stop) for x in (self.wa, self.wa_user, self.motion_user)))


def _slice_pad(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    idx = torch.arange(start, stop, device=x.device).clamp(max=x.shape[1] - 1)
    return x.index_select(1, idx)


def apply_rope_rows(k: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate every position of k [B, H, L, D] by the same per-row rotation rot [B, 1, D/2, 2]."""
    return apply_rope(k, rot.expand(k.shape[0], k.shape[2], *rot.shape[2:]))


def repeat_branches(x: torch.Tensor) -> torch.Tensor:
    return x.repeat(NUM_BRANCHES, *([1] * (x.dim() - 1)))


def pad_rows(x: torch.Tensor, extra: int) -> torch.Tensor:
    """Append `extra` copies of row 0 (inert rows that make a batch a fixed size)."""
    return torch.cat([x, x[:1].expand(extra, *x.shape[1:])]) if extra else x


def pad_branch_rows(x: torch.Tensor, extra: int) -> torch.Tensor:
    """pad_rows for a branch-major [3B, ...] tensor: each branch gets the extra rows."""
    if not extra:
        return x
    per_branch = x.unflatten(0, (NUM_BRANCHES, -1))
    return torch.cat([per_branch, per_branch[:, :1].expand(-1, extra, *x.shape[1:])], 1).flatten(0, 1)


def unpad_branch_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x.unflatten(0, (NUM_BRANCHES, -1))[:, :rows].flatten(0, 1)


class GuidedSampler:
    """Euler flow-matching sampling of one block with three-branch classifier-free guidance, and the KV
    cache updates after a block (priming or streaming)."""

    def __init__(self, transformer: FlowTransformer, cfg: SamplerConfig, *, skip_noop_steps: bool = True,
                 compile_fn=None, compile_loop: bool = False):
        """compile_fn: e.g. torch.compile with its options. It compiles the transformer call (the clean pass
        and each solver step), or with compile_loop the whole denoising loop as one graph (slower to compile:
        every step is unrolled into it)."""
        self.transformer = transformer
        self.forward = compile_fn(transformer.forward) if compile_fn else transformer  # the clean pass
        if compile_fn and compile_loop:
            self.step_forward = transformer  # traced into the loop's graph
            self.integrate = compile_fn(self.integrate_steps)
        else:
            self.step_forward = self.forward
            self.integrate = self.integrate_steps
        self.tcfg: FlowTransformerConfig = transformer.config
        self.schedule = FlowMatchSchedule(cfg)
        self.a_scale = cfg.a_cfg_scale
        self.u_scale = cfg.u_cfg_scale
        self.steps: list[SolverStep] = self.schedule.effective_steps() if skip_noop_steps else self.schedule.steps

    # -- guidance -----------------------------------------------------------------------------------------

    def branch_conditions(self, cond: Conditions) -> torch.Tensor:
        """Conditions of B rows -> the transformer condition of the 3B guidance rows [3B, L, dim_h]."""
        wa, wa_user, motion = cond.wa, cond.wa_user, cond.motion_user
        zero_a, zero_u, zero_m = torch.zeros_like(wa), torch.zeros_like(wa_user), torch.zeros_like(motion)
        return self.transformer.condition(
            torch.cat([zero_u, zero_u, wa_user]),
            torch.cat([zero_m, zero_m, motion]),
            torch.cat([zero_a, wa, zero_a]),
        )

    def guide(self, v: torch.Tensor) -> torch.Tensor:
        v_uncond, v_audio, v_user = v.chunk(NUM_BRANCHES)
        return v_uncond + self.a_scale * (v_audio - v_uncond) + self.u_scale * (v_user - v_uncond)

    # -- one block ----------------------------------------------------------------------------------------

    def denoise(self, x: torch.Tensor, num_context: int, cond3: torch.Tensor, r_s: torch.Tensor,
                positions: torch.Tensor, past: list[LayerKV] | None, trace: dict | None = None) -> torch.Tensor:
        """Integrate the new frames of x [B, L, D] from noise to data; the first num_context stay as given.

        cond3 [3B, L, dim_h] from `branch_conditions`; r_s [B, D]; positions [B, L]; past: 3B-row cache.
        """
        is_new = torch.arange(x.shape[1], device=x.device) >= num_context
        masks = self.transformer.masks(x.shape[1], past, x.device)
        args = (x, is_new, cond3, repeat_branches(r_s), repeat_branches(positions), past, masks)
        if trace is not None:  # the parity tests' record of every step: always the plain loop
            return self.integrate_steps(*args, trace=trace)
        return self.integrate(*args)

    def integrate_steps(self, x: torch.Tensor, is_new: torch.Tensor, cond3: torch.Tensor, r_s3: torch.Tensor,
                        pos3: torch.Tensor, past: list[LayerKV] | None, masks, trace: dict | None = None
                        ) -> torch.Tensor:
        """Every solver step of one block: the guided transformer call and the Euler update. Compiled as a
        whole (compile_loop), the loop is one graph per batch bucket and phase: no Python between steps, and
        on a GPU one CUDA graph replay per block."""
        b, n, _ = x.shape
        for step in self.steps:
            # Contiguous, as in the clean pass: a compiled graph specialises on strides, and one layout
            # for both calls keeps it to one graph per bucket and phase.
            t_frames = torch.where(is_new, step.t_cur, 0.0).to(x.dtype).expand(NUM_BRANCHES * b, n).contiguous()
            v_branches, _ = self.step_forward(repeat_branches(x), t_frames, cond3, r_s3, pos3, past, masks)
            v = self.guide(v_branches)
            # The solver update runs in float64, as upstream: x <- x + (sigma_next - sigma_cur) v.
            stepped = (x.double() + (step.sigma_next - step.sigma_cur) * v.double()).to(x.dtype)
            x_next = torch.where(is_new[None, :, None], stepped, x) if not step.is_noop else x
            if trace is not None:
                trace.setdefault("x_steps", []).append(x_next)
                trace.setdefault("v_branches", []).append(v_branches)
                trace.setdefault("v_guided", []).append(v)
                trace.setdefault("t_cur_frames", []).append(torch.where(is_new, step.t_cur, 0.0)[None])
                trace.setdefault("t_next_frames", []).append(torch.where(is_new, step.t_next, 0.0)[None])
            x = x_next
        return x

    # -- cache --------------------------------------------------------------------------------------------

    def clean_pass(self, x: torch.Tensor, cond3: torch.Tensor, r_s: torch.Tensor, positions: torch.Tensor,
                   past: list[LayerKV] | None) -> list[LayerKV]:
        """Re-run the transformer on the final latents at t = 0; return every token's keys/values."""
        x3 = repeat_branches(x)
        t0 = torch.zeros(x3.shape[:2], dtype=x.dtype, device=x.device)
        masks = self.transformer.masks(x.shape[1], past, x.device)
        _, kv = self.forward(x3, t0, cond3, r_s.repeat(NUM_BRANCHES, 1), repeat_branches(positions), past, masks)
        return kv

    def primed_cache(self, fresh: list[LayerKV]) -> list[LayerKV]:
        """After the priming window: self cache = frames [block, clip - context), cross = the last kept ones."""
        c = self.tcfg
        s0, s1 = c.block_frames, c.clip_frames - c.context_frames
        x0, x1 = c.clip_frames - c.context_frames - c.cross_cache_len, c.clip_frames - c.context_frames
        return [LayerKV(kv.self_k[:, :, s0:s1], kv.self_v[:, :, s0:s1], kv.cross_k[:, :, x0:x1],
                        kv.cross_v[:, :, x0:x1]) for kv in fresh]

    def rebase(self, cache: list[LayerKV], delta: torch.Tensor) -> list[LayerKV]:
        """Shift the RoPE positions of B rows down by delta [B] (int) without changing any output.

        Attention scores depend on q/k rotations only through position differences, so rotating every
        cached key back by delta and giving the next tokens positions - delta is exact (up to fp32
        rounding of one extra complex multiply). Keeps positions inside the reference's table forever.
        """
        back = self.transformer.rope[delta] * torch.tensor([1.0, -1.0], device=delta.device)  # conj: [B, D/2, 2]
        back = repeat_branches(back)[:, None]
        return [LayerKV(apply_rope_rows(kv.self_k, back), kv.self_v, kv.cross_k, kv.cross_v) for kv in cache]

    def advanced_cache(self, past: list[LayerKV], fresh: list[LayerKV]) -> list[LayerKV]:
        """After a streaming block: shift the self cache by one block and append context + new frames
        except the last `context` (they are re-fed as the next block's context)."""
        c = self.tcfg
        keep = c.block_frames
        new_end = c.block_tokens - c.context_frames
        x0, x1 = new_end - c.cross_cache_len, new_end
        out = []
        for old, kv in zip(past, fresh, strict=True):
            out.append(LayerKV(
                torch.cat([old.self_k[:, :, keep:], kv.self_k[:, :, :new_end]], 2),
                torch.cat([old.self_v[:, :, keep:], kv.self_v[:, :, :new_end]], 2),
                kv.cross_k[:, :, x0:x1],
                kv.cross_v[:, :, x0:x1],
            ))
        return out
