"""The streaming engine: many sessions, one batched step.

`step()` finds every session whose next block is due, encodes the conditions of all of them together
(wav2vec2 over all audio windows in one call, the motion encoder over all new webcam crops in one call),
runs the guided sampler once per phase for the whole batch (priming rows and streaming rows have different
token counts), refreshes their KV-cache slots, and decodes their frames. The engine is single-threaded:
one owner (the server's GPU worker, the offline generator, a benchmark) calls open/close/step; only the
sessions' input pushes may come from other threads.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..avatar_forcing import AvatarForcing
from ..flow_transformer import LayerKV
from ..media.image import to_model_input, to_uint8
from ..motion_autoencoder import PortraitCode
from ..sampler import Conditions, GuidedSampler, NoiseFn, pad_branch_rows, pad_rows, unpad_branch_rows
from .drift import PoseAnchor, PoseAnchorSettings
from .inputs import BlockRequest, LiveInputs, LiveSettings, PrecomputedInputs
from .kv_pool import KVCachePool, PoolFullError
from .portraits import PortraitCache
from .session import BlockOutput, Session, generator_noise

STAGES = ("audio_features", "user_motion", "transformer", "cache_update", "decode")


@dataclass
class EngineSettings:
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
    # A live session's silent lead-in is mostly never shown (only its last moments play before the first
    # streaming block): decode just its last N frames. None decodes all.
    lead_in_frames_shown: int | None = None
    portrait_cache: int = 32


def batch_buckets(max_sessions: int) -> tuple[int, ...]:
    """Powers of two up to the capacity, and the capacity itself: one compiled graph per bucket."""
    sizes = {1 << i for i in range(max_sessions.bit_length()) if 1 << i <= max_sessions}
    return tuple(sorted(sizes | {max_sessions}))


class StageTimer:
    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def __call__(self, stage: str):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.seconds[stage] += time.perf_counter() - t0


@dataclass
class _Due:
    session: Session
    start: int  # first token's frame (context included)
    stop: int  # one past the last token's frame
    ready_at: float

    @property
    def priming(self) -> bool:
        return self.session.next_frame == 0


class StreamingEngine:
    def __init__(self, model: AvatarForcing, settings: EngineSettings | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.model = model
        self.settings = settings or EngineSettings()
        cfg = model.config
        self.tcfg = cfg.transformer
        self.fps = cfg.fps
        self.samples_per_frame = cfg.audio.samples_per_frame
        self.live_settings = replace(self.settings.live, fps=cfg.fps, sample_rate=cfg.sampling_rate,
                                     context_frames=self.tcfg.context_frames, frame_size=cfg.motion.input_size)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        forward = None
        if self.settings.compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            # One graph per bucket and phase (priming / streaming): allow them all.
            buckets = len(self.settings.batch_buckets or (1,))
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * buckets + 8)
            forward = torch.compile(model.flow_transformer.forward, mode=mode, dynamic=False)
        self.sampler = GuidedSampler(model.flow_transformer, cfg.sampler,
                                     skip_noop_steps=not self.settings.upstream_steps, forward=forward)
        default_chunk = 10 if self.device.type == "cpu" else 128
        self.motion_chunk = self.settings.motion_chunk or default_chunk
        self.decode_chunk = self.settings.decode_chunk or default_chunk
        if self.settings.precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be float32 or bfloat16, got {self.settings.precision!r}")
        self.bf16 = self.settings.precision == "bfloat16"
        self.pool = KVCachePool(self.tcfg, self.settings.max_sessions, self.device,
                                torch.bfloat16 if self.bf16 else self.dtype)
        self.portraits = PortraitCache(model.motion_autoencoder, self.settings.portrait_cache)
        self.sessions: dict[str, Session] = {}
        self.clock = clock
        self._ids = itertools.count()

    # -- sessions -----------------------------------------------------------------------------------------

    @property
    def capacity_left(self) -> int:
        return self.pool.free_slots

    def new_live_inputs(self) -> LiveInputs:
        return LiveInputs(self.live_settings)

    def open_session(self, portrait: np.ndarray | PortraitCode, *, inputs: LiveInputs | PrecomputedInputs | None = None,
                     seed: int | None = None, noise: NoiseFn | None = None, session_id: str | None = None,
                     now: float | None = None) -> Session:
        """Portrait: an RGB uint8 face crop (encoded once per distinct image) or a ready PortraitCode."""
        sid = session_id or f"s{next(self._ids)}"
        if sid in self.sessions:
            raise ValueError(f"session {sid} is already open")
        slot = self.pool.allocate()  # PoolFullError when full
        try:
            code = portrait if isinstance(portrait, PortraitCode) else self.portraits.get(portrait)
        except Exception:
            self.pool.release(slot)
            raise
        seed = secrets.randbits(63) if seed is None else seed
        session = Session(
            id=sid, slot=slot, portrait=code, inputs=inputs or self.new_live_inputs(),
            noise=noise or generator_noise(seed, self.device, self.dtype), seed=seed,
            clock_start=self.clock() if now is None else now,
        )
        self.sessions[sid] = session
        return session

    def close_session(self, session_id: str) -> None:
        session = self.sessions.pop(session_id)
        self.pool.release(session.slot)

    # -- scheduling ---------------------------------------------------------------------------------------

    def _due(self, session: Session, now: float) -> _Due | None:
        if session.finished:
            return None
        c = self.tcfg
        if session.next_frame == 0:
            start, stop = 0, c.clip_frames
        else:
            start, stop = session.next_frame - c.context_frames, session.next_frame + c.block_frames
        inputs = session.inputs
        needed = stop if inputs.total_frames is None else min(stop, inputs.total_frames)
        now_frame = (now - session.clock_start) * self.fps + inputs.origin
        if inputs.ready_until(now_frame) < needed:
            return None
        # When the last input of the block was (or will have been) captured in real time.
        ready_at = session.clock_start + (needed - inputs.origin) / self.fps
        return _Due(session, start, stop, min(ready_at, now))

    def due(self, now: float | None = None) -> list[_Due]:
        now = self.clock() if now is None else now
        return [d for d in (self._due(s, now) for s in self.sessions.values()) if d is not None]

    # -- stepping -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, now: float | None = None) -> list[BlockOutput]:
        """Advance every due session by one block; returns their outputs (possibly none)."""
        now = self.clock() if now is None else now
        due = self.due(now)
        if self.settings.batching:
            groups = [g for g in ([d for d in due if d.priming], [d for d in due if not d.priming]) if g]
        else:
            groups = [[d] for d in due]
        outputs: list[BlockOutput] = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for group in groups:
                outputs.extend(self._run(group))
        return outputs

    def _run(self, group: list[_Due]) -> list[BlockOutput]:
        c = self.tcfg
        timer = StageTimer(self.device)
        priming = group[0].priming
        sessions = [d.session for d in group]
        requests = [s.inputs.request(d.start, d.stop) for s, d in zip(sessions, group)]

        cond = self._conditions(sessions, requests, timer)
        r_s = torch.cat([s.portrait.r_s for s in sessions])
        slots = torch.tensor([s.slot for s in sessions], device=self.device)
        b = len(group)
        extra = self._bucket(b) - b  # inert rows: copies of row 0, never written back

        with timer("transformer"):
            cond3 = self.sampler.branch_conditions(Conditions(*(pad_rows(t, extra) for t in (
                cond.wa, cond.wa_user, cond.motion_user))))
            if priming:
                past, num_context = None, 0
                x = torch.cat([s.noise((1, c.clip_frames, c.dim_w)) for s in sessions])
            else:
                past, num_context = self.pool.gather(slots), c.context_frames
                past = self._rebase_if_needed(group, past)
                past = [kv.map(lambda t: pad_branch_rows(t, extra)) for kv in past]
                x = torch.cat([torch.cat([s.context, s.noise((1, c.block_frames, c.dim_w))], 1) for s in sessions])
            offsets = torch.tensor([[s.position_offset] for s in sessions], device=self.device)
            positions = torch.stack([torch.arange(d.start, d.stop, device=self.device) for d in group]) - offsets
            x, r_s, positions = pad_rows(x, extra), pad_rows(r_s, extra), pad_rows(positions, extra)
            x = self.sampler.denoise(x, num_context, cond3, r_s, positions, past)
            if self.settings.pose_anchor is not None and not priming:
                x = torch.cat([self._anchor(sessions, x[:b], num_context), x[b:]])

        with timer("cache_update"):
            fresh = self.sampler.clean_pass(x, cond3, r_s, positions, past)
            cache = self.sampler.primed_cache(fresh) if priming else self.sampler.advanced_cache(past, fresh)
            self.pool.scatter(slots, [kv.map(lambda t: unpad_branch_rows(t, b)) for kv in cache])
            x = x[:b]

        new = x[:, num_context:]
        spans = []  # per row: first frame, offset into `new`, count
        for row, (session, due) in enumerate(zip(sessions, group)):
            first, offset, count = session.next_frame, 0, new.shape[1]
            if session.inputs.total_frames is not None:
                count = min(count, session.inputs.total_frames - first)
            shown = self.settings.lead_in_frames_shown
            if shown is not None and first + count <= session.inputs.origin and count > shown:
                offset, count = count - shown, shown
            spans.append((first + offset, offset, count))
            session.context = x[row:row + 1, -c.context_frames:]
            session.next_frame = due.stop
            session.inputs.consumed(session.next_frame)

        frames: list[np.ndarray | None] = [None] * b
        if self.settings.decode:
            with timer("decode"):
                frames = self._decode(sessions, new, spans)

        outputs = []
        for row, (session, due) in enumerate(zip(sessions, group)):
            first, offset, count = spans[row]
            outputs.append(BlockOutput(
                session_id=session.id, index=session.blocks_done, first_frame=first,
                latents=new[row, offset:offset + count], frames=frames[row],
                audio=session.inputs.avatar_audio(first, first + count),
                lead_in=first + count <= session.inputs.origin, ready_at=due.ready_at, done_at=0.0,
                timings=timer.seconds, batch_size=b,
                conditions=(cond.rows(row, num_context + offset, num_context + offset + count)
                            if self.settings.record_conditions else None),
            ))
            session.blocks_done += 1
        done = self.clock()
        for out in outputs:
            out.done_at = done
        return outputs

    def _decode(self, sessions: list[Session], new: torch.Tensor, spans: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """Every row's new frames through the decoder together (rows padded to the longest by repeating
        their last latent, then trimmed)."""
        longest = max(count for _, _, count in spans)
        padded = torch.stack([
            new[row, offset + torch.arange(longest, device=new.device).clamp(max=count - 1)]
            for row, (_, offset, count) in enumerate(spans)
        ])
        images = self.model.motion_autoencoder.decode_batch([s.portrait for s in sessions], padded,
                                                            chunk=self.decode_chunk)
        return [to_uint8(images[row, :count]) for row, (_, _, count) in enumerate(spans)]

    @torch.inference_mode()
    def precompile(self) -> None:
        """Run every batch bucket through both phases once on dummy inputs, so compiling (and capturing
        CUDA graphs) happens at start-up, not while live sessions wait."""
        c = self.tcfg
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for rows in self.settings.batch_buckets or (1,):
                for tokens, past_len in ((c.clip_frames, None), (c.block_tokens, c.self_cache_len)):
                    zeros = lambda *shape: torch.zeros(shape, device=self.device, dtype=self.dtype)  # noqa: E731
                    cond = Conditions(zeros(rows, tokens, c.dim_a), zeros(rows, tokens, c.dim_a),
                                      zeros(rows, tokens, c.dim_w))
                    cond3 = self.sampler.branch_conditions(cond)
                    past = None if past_len is None else [LayerKV(
                        zeros(3 * rows, c.num_heads, past_len, c.head_dim), zeros(3 * rows, c.num_heads, past_len, c.head_dim),
                        zeros(3 * rows, c.num_heads, c.cross_cache_len, c.head_dim),
                        zeros(3 * rows, c.num_heads, c.cross_cache_len, c.head_dim)) for _ in range(c.depth)]
                    positions = torch.arange(tokens, device=self.device).expand(rows, -1)
                    x = self.sampler.denoise(zeros(rows, tokens, c.dim_w), 0 if past is None else c.context_frames,
                                             cond3, zeros(rows, c.dim_w), positions, past)
                    self.sampler.clean_pass(x, cond3, zeros(rows, c.dim_w), positions, past)

    # -- conditions ---------------------------------------------------------------------------------------

    def _conditions(self, sessions: list[Session], requests: list[BlockRequest], timer: StageTimer) -> Conditions:
        rows: list[Conditions | None] = [r.conditions for r in requests]
        live = [i for i, r in enumerate(requests) if r.live is not None]
        if live:
            with timer("audio_features"):
                wa, wa_user = self._audio_features([requests[i] for i in live])
            with timer("user_motion"):
                motion = self._user_motion([sessions[i] for i in live], [requests[i] for i in live])
            for j, i in enumerate(live):
                rows[i] = Conditions(wa[j:j + 1], wa_user[j:j + 1], motion[j:j + 1])
        return Conditions(*(torch.cat([getattr(r, f) for r in rows]).to(self.device, self.dtype)
                            for f in ("wa", "wa_user", "motion_user")))

    def _audio_features(self, requests: list[BlockRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both tracks of every live row through wav2vec2 in one call."""
        windows = [r.live.avatar_pcm for r in requests] + [r.live.user_pcm for r in requests]
        wave = torch.from_numpy(np.stack(windows)).to(self.device, self.dtype)
        num_frames = wave.shape[1] // self.samples_per_frame
        feats = self.model.audio_encoder(wave, num_frames)
        b = len(requests)
        wa = torch.stack([feats[i, r.start - r.live.avatar_first_frame:r.stop - r.live.avatar_first_frame]
                          for i, r in enumerate(requests)])
        wa_user = torch.stack([feats[b + i, r.start - r.live.first_frame:r.stop - r.live.first_frame]
                               for i, r in enumerate(requests)])
        return wa, wa_user

    def _user_motion(self, sessions: list[Session], requests: list[BlockRequest]) -> torch.Tensor:
        """Motion latents of the webcam frames feeding each row; new crops encoded in one batch."""
        mae = self.model.motion_autoencoder
        todo: list[tuple[Session, int, np.ndarray]] = []
        for s, r in zip(sessions, requests):
            for fid in dict.fromkeys(f for f in r.live.frame_ids if f is not None):
                if fid not in s.motion_latents:
                    image = s.inputs.frames.image(fid)
                    if image is not None:
                        todo.append((s, fid, image))
        for i in range(0, len(todo), self.motion_chunk):
            chunk = todo[i:i + self.motion_chunk]
            pixels = to_model_input(np.stack([img for _, _, img in chunk])).to(self.device, self.dtype)
            for (s, fid, _), latent in zip(chunk, mae.encode_motion(pixels)):
                s.remember_motion(fid, latent)
        zero = torch.zeros(self.tcfg.dim_w, device=self.device, dtype=self.dtype)
        return torch.stack([
            torch.stack([s.motion_latents.get(fid, zero) if fid is not None else zero for fid in r.live.frame_ids])
            for s, r in zip(sessions, requests)
        ])

    def _bucket(self, rows: int) -> int:
        buckets = self.settings.batch_buckets
        if not buckets:
            return rows
        return min((size for size in buckets if size >= rows), default=rows)

    def _anchor(self, sessions: list[Session], x: torch.Tensor, num_context: int) -> torch.Tensor:
        """Pull each row's new frames towards its portrait's pose (before they are cached and shown)."""
        rows = []
        for row, s in enumerate(sessions):
            if s.anchor is None:
                s.anchor = PoseAnchor(self.settings.pose_anchor)
            new = s.anchor.apply(x[row, num_context:], s.portrait.r_s[0])
            rows.append(torch.cat([x[row, :num_context], new]))
        return torch.stack(rows)

    # -- positions ----------------------------------------------------------------------------------------

    def _rebase_if_needed(self, group: list[_Due], past):
        """Keep every row's RoPE positions inside the table (exact: see GuidedSampler.rebase)."""
        table = self.model.flow_transformer.rope.shape[0]
        deltas = []
        for d in group:
            s = d.session
            delta = 0
            if d.stop - s.position_offset > table:
                delta = d.start - s.position_offset - self.tcfg.rebase_position
                s.position_offset += delta
            deltas.append(delta)
        if not any(deltas):
            return past
        return self.sampler.rebase(past, torch.tensor(deltas, device=self.device))


__all__ = ["EngineSettings", "StreamingEngine", "PoolFullError", "STAGES", "batch_buckets"]
