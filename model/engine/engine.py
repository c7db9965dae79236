"""The streaming engine: many sessions, one batched step.

A step is planned, run and applied, in the manner of vLLM's scheduler / runner split:
- `Scheduler.plan` (scheduler.py) picks the sessions whose next block is due, groups them by phase and
  gives each group its static batch size;
- the engine turns each planned batch into tensors (the rows' initial latents, positions and caches from
  the KV pool), hands them to the `BlockRunner` (runner.py: conditions -> denoise -> cache update ->
  decode), then applies the results to the sessions explicitly (`_commit`).

The engine is single-threaded: one owner (the server's model worker, the offline generator, a benchmark,
the parity tests) calls open/close/step; only the sessions' input pushes may come from other threads.
"""

from __future__ import annotations

import functools
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..avatar_forcing import AvatarForcing
from ..flow_transformer import LayerKV
from ..motion_autoencoder import PortraitCode
from ..sampler import GuidedSampler, NoiseFn
from .drift import PoseAnchor, PoseAnchorSettings
from .inputs import LiveInputs, LiveSettings, SessionInputs
from .kv_pool import KVCachePool, PoolFullError
from .portraits import PortraitCache
from .runner import STAGES, BatchInputs, BlockRunner, StageTimer
from .scheduler import Phase, PlannedBatch, PlannedRow, Scheduler, batch_buckets
from .session import BlockOutput, Session, generator_noise

# marker(session_ids, frames): frames RGB uint8 [B, N, H, W, 3] on the model's device -> the same, marked.
FrameMarker = Callable[[list[str], torch.Tensor], torch.Tensor]


@dataclass
class EngineSettings:
    """How the engine runs: capacity, precision, batching and buckets, compilation, decoding, catch-up."""

    max_sessions: int = 16
    live: LiveSettings = field(default_factory=LiveSettings)
    decode: bool = True
    # Frames per encoder / decoder call. None: 10 on a CPU (cache-sized activations measured fastest
    # there, see `bench engine`), 128 on a GPU (bigger batches fill it).
    decode_chunk: int | None = None
    motion_chunk: int | None = None
    batching: bool = True  # False steps due sessions one at a time (the baseline of the benchmark)
    record_conditions: bool = False  # attach each block's conditions to its output (measurements, debugging)
    pose_anchor: PoseAnchorSettings | None = None  # optional drift control (off: the reference's outputs)
    # "bfloat16": the networks run under bf16 autocast, as upstream (fp32 weights; the warp grid, QR,
    # RoPE angles, timestep sinusoid and the Euler update stay fp32/fp64), and the KV cache is stored in
    # bf16. "float32": exact reference numerics.
    precision: str = "float32"
    upstream_steps: bool = False  # also run the reference's final t=0 -> 0 transformer call (a no-op)
    # Static shapes: pad each step's batch with inert rows up to the next of these sizes, so compiled
    # graphs are reused (one per bucket and phase). None: no padding.
    batch_buckets: tuple[int, ...] | None = None
    # torch.compile the transformer; on a GPU with mode "reduce-overhead", i.e. CUDA graphs per bucket.
    compile: bool = False
    compile_scope: str = "step"  # "step": the transformer call; "loop": the whole denoising loop, one graph
    # The motion auto-encoder's convolutions in channels_last (NHWC) memory, the layout GPU tensor cores
    # read without transposes. Converts the model's conv weights in place (activations follow them).
    channels_last: bool = False
    # A live session's silent lead-in is mostly never shown (only its last moments play before the first
    # streaming block): decode just its last N frames. None decodes all.
    lead_in_frames_shown: int | None = None
    portrait_cache: int = 32
    # Catch-up: a live session whose next block would end more than this many frames before its newest
    # input skips ahead to it (stale blocks are never generated). None: never skip (offline generation).
    max_lag_frames: int | None = None
    frame_marker: FrameMarker | None = None  # applied to every decoded frame (e.g. an invisible watermark)
    profile_stages: bool = False  # synchronise the GPU around each stage so stage times are exact


class StreamingEngine:
    """Sessions, the KV-cache pool and batched block steps (see the module docstring)."""

    def __init__(self, model: AvatarForcing, settings: EngineSettings | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.model = model
        self.settings = settings or EngineSettings()
        cfg = model.config
        self.tcfg = cfg.transformer
        self.fps = cfg.fps
        # The live inputs follow the model: its rates, context and crop size, and a silent lead-in as long as
        # the priming window (unless a caller asked for none, as `bench audio-window` does).
        lead_in = self.settings.live.lead_in_frames and self.tcfg.clip_frames
        self.live_settings = replace(self.settings.live, fps=cfg.fps, sample_rate=cfg.sampling_rate,
                                     context_frames=self.tcfg.context_frames, frame_size=cfg.motion.input_size,
                                     lead_in_frames=lead_in)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.settings.decode and model.motion_autoencoder.canonical is not None:
            model.motion_autoencoder.canonical.require_set()  # refuse at start-up, not at the first session
        if self.settings.channels_last:
            for weight in model.motion_autoencoder.parameters():
                if weight.dim() == 4:  # conv kernels (Module.to refuses modules that also hold other ranks)
                    weight.data = weight.data.contiguous(memory_format=torch.channels_last)
        if self.settings.compile_scope not in ("step", "loop"):
            raise ValueError(f"compile_scope must be 'step' or 'loop', got {self.settings.compile_scope!r}")
        if self.settings.precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be float32 or bfloat16, got {self.settings.precision!r}")
        self.bf16 = self.settings.precision == "bfloat16"
        self.cache_dtype = torch.bfloat16 if self.bf16 else self.dtype
        buckets = self.settings.batch_buckets
        compile_fn = None
        if self.settings.compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            # Per bucket and phase (priming / streaming): one graph for the transformer call, plus one for the
            # whole denoising loop when that is compiled too.
            graphs = 2 * len(Phase) * len(buckets or (1,))
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, graphs + 8)
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, graphs + 8)
            compile_fn = functools.partial(torch.compile, mode=mode, dynamic=False)
        sampler = GuidedSampler(model.flow_transformer, cfg.sampler,
                                skip_noop_steps=not self.settings.upstream_steps, compile_fn=compile_fn,
                                compile_loop=self.settings.compile_scope == "loop")
        default_chunk = 10 if self.device.type == "cpu" else 128
        self.runner = BlockRunner(model, sampler, motion_chunk=self.settings.motion_chunk or default_chunk,
                                  decode_chunk=self.settings.decode_chunk or default_chunk)
        self.scheduler = Scheduler(self.tcfg, self.fps, buckets=buckets, batching=self.settings.batching,
                                   max_lag_frames=self.settings.max_lag_frames)
        self.pool = KVCachePool(self.tcfg, self.settings.max_sessions, self.device, self.cache_dtype)
        self.portraits = PortraitCache(model.motion_autoencoder, self.settings.portrait_cache)
        self.sessions: dict[str, Session] = {}
        self.clock = clock
        self.trace: list[dict] | None = None  # set to a list to record every block's tensors (parity tests)
        self._ids = itertools.count()

    @property
    def sampler(self) -> GuidedSampler:
        return self.runner.sampler

    # -- sessions -----------------------------------------------------------------------------------------

    @property
    def capacity_left(self) -> int:
        return self.pool.free_slots

    def new_live_inputs(self) -> LiveInputs:
        return LiveInputs(self.live_settings)

    def open_session(self, portrait: np.ndarray | PortraitCode, *, inputs: SessionInputs | None = None,
                     seed: int | None = None, noise: NoiseFn | None = None, session_id: str | None = None,
                     now: float | None = None) -> Session:
        """Portrait: an RGB uint8 face crop (encoded once per distinct image) or a ready PortraitCode.
        Everything that can fail is done before a KV slot is taken, so a failed open leaks nothing."""
        sid = session_id or f"s{next(self._ids)}"
        if sid in self.sessions:
            raise ValueError(f"session {sid} is already open")
        if seed is None:
            seed = secrets.randbits(63)
        elif not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}")
        noise = noise or generator_noise(seed, self.device, self.dtype)
        code = portrait if isinstance(portrait, PortraitCode) else self.portraits.get(portrait)
        inputs = inputs or self.new_live_inputs()
        # Live webcam latents are encoded here, frame by frame; precomputed ones come relative already.
        reference = self.model.motion_autoencoder.user_reference(self.fps) if isinstance(inputs, LiveInputs) else None
        slot = self.pool.allocate()  # PoolFullError when full
        session = Session(
            id=sid, slot=slot, portrait=code, inputs=inputs, noise=noise, seed=seed,
            clock_start=self.clock() if now is None else now, user_reference=reference,
        )
        self.sessions[sid] = session
        return session

    def close_session(self, session_id: str) -> None:
        session = self.sessions.pop(session_id)
        self.pool.release(session.slot)

    # -- stepping -----------------------------------------------------------------------------------------

    def due(self, now: float | None = None) -> list[PlannedRow]:
        return self.scheduler.plan(self.sessions.values(), self.clock() if now is None else now).rows

    @torch.inference_mode()
    def step(self, now: float | None = None) -> list[BlockOutput]:
        """Advance every due session by one block; returns their outputs (possibly none)."""
        plan = self.scheduler.plan(self.sessions.values(), self.clock() if now is None else now)
        outputs: list[BlockOutput] = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for batch in plan.batches:
                outputs.extend(self._advance(batch))
        return outputs

    def _advance(self, batch: PlannedBatch) -> list[BlockOutput]:
        timer = StageTimer(sync=self.settings.profile_stages)
        rows = batch.rows
        sessions = [row.session for row in rows]
        for row in rows:
            if row.skip:
                self._skip(row.session, row.skip)
        requests = [s.inputs.request(r.start + s.input_offset, r.stop + s.input_offset)
                    for s, r in zip(sessions, rows, strict=True)]
        cond, learned = self.runner.conditions(requests, [s.motion_latents for s in sessions], timer,
                                               [s.user_reference for s in sessions])
        for session, latents in zip(sessions, learned, strict=True):
            for fid, latent in latents.items():
                session.remember_motion(fid, latent)

        slots = torch.tensor([s.slot for s in sessions], device=self.device)
        inputs = self._batch_inputs(batch, cond, slots)
        adjust = None
        if self.settings.pose_anchor is not None and not inputs.priming:
            adjust = lambda x: self._anchor(sessions, x, inputs.num_context)  # noqa: E731
        result = self.runner.run(inputs, batch.bucket, timer, adjust=adjust, trace=self.trace)
        self.pool.scatter(slots, result.cache)

        new = result.latents[:, inputs.num_context:]
        spans = self._commit(rows, result.latents)
        frames: list[np.ndarray | None] = [None] * len(rows)
        if self.settings.decode:
            frames = self._frames(sessions, new, spans, timer)

        outputs = []
        for i, (session, row) in enumerate(zip(sessions, rows, strict=True)):
            first, offset, count = spans[i]
            outputs.append(BlockOutput(
                session_id=session.id, index=session.blocks_done, first_frame=first,
                latents=new[i, offset:offset + count], frames=frames[i],
                audio=session.inputs.avatar_audio(first, first + count),
                lead_in=first + count <= session.inputs.origin, ready_at=row.ready_at, done_at=0.0,
                timings=timer.seconds, batch_size=len(rows),
                conditions=(cond.rows(i, inputs.num_context + offset, inputs.num_context + offset + count)
                            if self.settings.record_conditions else None),
                skipped_frames=row.skip,
            ))
            session.blocks_done += 1
        done = self.clock()
        for out in outputs:
            out.done_at = done
        return outputs

    def _batch_inputs(self, batch: PlannedBatch, cond, slots: torch.Tensor) -> BatchInputs:
        """The rows' initial latents, RoPE positions and caches (streaming rows are rebased when their
        positions would leave the RoPE table)."""
        c = self.tcfg
        rows = batch.rows
        sessions = [row.session for row in rows]
        if batch.phase is Phase.PRIMING:
            past, num_context = None, 0
            x = torch.cat([s.noise((1, c.clip_frames, c.dim_w)) for s in sessions])
        else:
            past, num_context = self._rebase_if_needed(rows, self.pool.gather(slots)), c.context_frames
            x = torch.cat([torch.cat([s.context, s.noise((1, c.block_frames, c.dim_w))], 1)  # type: ignore[list-item]
                           for s in sessions])
        offsets = torch.tensor([[s.position_offset] for s in sessions], device=self.device)
        positions = torch.stack([torch.arange(r.start, r.stop, device=self.device) for r in rows]) - offsets
        r_s = torch.cat([s.portrait.r_s for s in sessions])
        return BatchInputs(x.to(self.device, self.dtype), num_context, cond, r_s, positions, past)

    def _commit(self, rows: list[PlannedRow], latents: torch.Tensor) -> list[tuple[int, int, int]]:
        """Apply a finished block to its sessions; returns per row (first input frame shown, offset into
        the new latents, count)."""
        c = self.tcfg
        spans = []
        new_frames = latents.shape[1] - (0 if rows[0].phase is Phase.PRIMING else c.context_frames)
        for i, row in enumerate(rows):
            session = row.session
            first, offset, count = session.next_frame + session.input_offset, 0, new_frames
            if session.inputs.total_frames is not None:
                count = min(count, session.inputs.total_frames - first)
            shown = self.settings.lead_in_frames_shown
            if shown is not None and first + count <= session.inputs.origin and count > shown:
                offset, count = count - shown, shown
            spans.append((first + offset, offset, count))
            session.context = latents[i:i + 1, -c.context_frames:]
            session.next_frame = row.stop
            session.inputs.consumed(session.next_frame + session.input_offset)
        return spans

    def _skip(self, session: Session, frames: int) -> None:
        """Catch-up: the session's next block starts `frames` input frames later; the model's frames stay
        contiguous (its context and cache are unchanged), so motion goes on smoothly from where it was."""
        session.inputs.skip(session.next_frame + session.input_offset, frames)
        session.input_offset += frames

    def _frames(self, sessions: list[Session], new: torch.Tensor, spans: list[tuple[int, int, int]],
                timer: StageTimer) -> list[np.ndarray | None]:
        """Decoded (and marked) frames of every row, downloaded from the device once."""
        pixels = self.runner.decode([s.portrait for s in sessions], new,
                                    [(offset, count) for _, offset, count in spans], timer)
        if self.settings.frame_marker is not None:
            pixels = self.settings.frame_marker([s.id for s in sessions], pixels)
        host = pixels.cpu().numpy()
        return [host[i, :count] for i, (_, _, count) in enumerate(spans)]

    @torch.inference_mode()
    def precompile(self) -> None:
        """Compile (and on a GPU capture) every bucket and phase at start-up."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            self.runner.precompile(self.settings.batch_buckets or (1,), self.cache_dtype)

    # -- state helpers ------------------------------------------------------------------------------------

    def _anchor(self, sessions: list[Session], x: torch.Tensor, num_context: int) -> torch.Tensor:
        """Pull each row's new frames towards its portrait's pose (before they are cached and shown)."""
        rows = []
        for row, s in enumerate(sessions):
            if s.anchor is None:
                assert self.settings.pose_anchor is not None
                s.anchor = PoseAnchor(self.settings.pose_anchor)
            new = s.anchor.apply(x[row, num_context:], s.portrait.r_s[0])
            rows.append(torch.cat([x[row, :num_context], new]))
        return torch.stack(rows)

    def _rebase_if_needed(self, rows: list[PlannedRow], past: list[LayerKV]) -> list[LayerKV]:
        """Keep every row's RoPE positions inside the table (exact: see GuidedSampler.rebase)."""
        table = self.model.flow_transformer.rope.shape[0]
        deltas = []
        for row in rows:
            s = row.session
            delta = 0
            if row.stop - s.position_offset > table:
                delta = row.start - s.position_offset - self.tcfg.rebase_position
                s.position_offset += delta
            deltas.append(delta)
        if not any(deltas):
            return past
        return self.sampler.rebase(past, torch.tensor(deltas, device=self.device))


__all__ = ["STAGES", "EngineSettings", "FrameMarker", "PoolFullError", "StreamingEngine", "batch_buckets"]
