"""The block runner: one batch of rows through the model, and nothing else.

conditions (wav2vec2 over every live row's audio windows in one call, the motion encoder over every new
webcam crop in one call) -> guided denoising -> KV-cache update -> decoding. The runner holds no session
state: the engine hands it tensors (initial latents, positions, the rows' caches) and applies what comes
back. It works on any device; padding rows up to a bucket keeps shapes static for compiled graphs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..avatar_forcing import AvatarForcing
from ..canonical import UserReference
from ..flow_transformer import LayerKV
from ..media.image import to_uint8_tensor
from ..motion_autoencoder import PortraitCode
from ..sampler import Conditions, GuidedSampler, pad_branch_rows, pad_rows, repeat_branches, unpad_branch_rows
from ..user_expression import UserExpressionReader, UserMotionReader
from .inputs import BlockRequest, LiveRequest, LiveWindows
from .staging import PinnedUploads, normalise_pixels

STAGES = ("audio_features", "user_motion", "transformer", "cache_update", "decode")


class StageTimer:
    """Wall time per stage of one step. Synchronises the GPU only when asked to (profiling): a sync per
    stage would serialise the host and the device."""

    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.seconds[stage] += time.perf_counter() - t0


@dataclass
class BatchInputs:
    """What one batch of B rows needs, unpadded."""

    x_init: torch.Tensor  # [B, L, dim_w]: context latents (streaming) followed by noise
    num_context: int  # leading tokens of x_init that stay as given
    cond: Conditions  # per-frame conditions of the L tokens
    r_s: torch.Tensor  # [B, dim_w] portrait motion codes
    positions: torch.Tensor  # [B, L] RoPE positions
    past: list[LayerKV] | None  # [3B]-row caches (streaming), None when priming

    @property
    def priming(self) -> bool:
        return self.past is None


@dataclass
class BatchResult:
    """What a batch produced: its final latents and the caches of its next block."""

    latents: torch.Tensor  # [B, L, dim_w] final latents, context included
    cache: list[LayerKV]  # [3B]-row caches to store for the next block


Adjust = Callable[[torch.Tensor], torch.Tensor]  # edits denoised latents before they are cached (drift control)


class BlockRunner:
    """Runs one planned batch through the model (conditions, denoise, cache update, decode); holds no
    session state."""

    def __init__(self, model: AvatarForcing, sampler: GuidedSampler, *, motion_chunk: int, decode_chunk: int):
        self.model = model
        self.sampler = sampler
        self.cfg = model.config.transformer
        self.samples_per_frame = model.config.audio.samples_per_frame
        self.motion_chunk = motion_chunk
        self.decode_chunk = decode_chunk
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # uint8 crops and float32 audio go up through pinned buffers; pixels are normalised on the device.
        self.upload_pixels = PinnedUploads(self.device)
        self.upload_audio = PinnedUploads(self.device)

    # -- conditions ---------------------------------------------------------------------------------------

    def conditions(self, requests: list[BlockRequest], known_motion: list[Mapping[int, torch.Tensor]],
                   timer: StageTimer, references: Sequence[UserMotionReader] | None = None,
                   ) -> tuple[Conditions, list[dict[int, torch.Tensor]]]:
        """Per-frame conditions of every row, and the webcam latents newly encoded per row (for the caller
        to remember: a frame feeds several blocks). `references`: per row, the user's running reference that
        new webcam latents are taken relative to (`relative_user_motion`), or the reader that makes them
        (`user_expression`), or None."""
        refs = list(references) if references is not None else [None] * len(requests)
        rows: list[Conditions | None] = [None] * len(requests)
        learned: list[dict[int, torch.Tensor]] = [{} for _ in requests]
        live = [i for i, r in enumerate(requests) if isinstance(r, LiveRequest)]
        for i, r in enumerate(requests):
            if not isinstance(r, LiveRequest):
                rows[i] = r.conditions
        if live:
            live_requests = [r for r in requests if isinstance(r, LiveRequest)]
            with timer("audio_features"):
                wa, wa_user = self._audio_features(live_requests)
            with timer("user_motion"):
                motion = self._user_motion([r.windows for r in live_requests], [known_motion[i] for i in live],
                                           [learned[i] for i in live], [refs[i] for i in live])
            for j, i in enumerate(live):
                rows[i] = Conditions(wa[j:j + 1], wa_user[j:j + 1], motion[j:j + 1])
        ready = [r for r in rows if r is not None]
        return Conditions(*(torch.cat([getattr(r, f) for r in ready]).to(self.device, self.dtype)
                            for f in ("wa", "wa_user", "motion_user"))), learned

    def _audio_features(self, requests: list[LiveRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both tracks of every live row through wav2vec2 in one call."""
        windows = [r.windows.avatar_pcm for r in requests] + [r.windows.user_pcm for r in requests]
        wave = self.upload_audio(np.stack(windows)).to(self.dtype)
        num_frames = wave.shape[1] // self.samples_per_frame
        feats = self.model.audio_encoder(wave, num_frames)
        b = len(requests)
        wa = torch.stack([feats[i, r.start - r.windows.avatar_first_frame:r.stop - r.windows.avatar_first_frame]
                          for i, r in enumerate(requests)])
        wa_user = torch.stack([feats[b + i, r.start - r.windows.first_frame:r.stop - r.windows.first_frame]
                               for i, r in enumerate(requests)])
        return wa, wa_user

    def _user_motion(self, windows: list[LiveWindows], known: list[Mapping[int, torch.Tensor]],
                     learned: list[dict[int, torch.Tensor]], references: list[UserMotionReader]) -> torch.Tensor:
        """Motion latents of the webcam frames feeding each row; new crops encoded together (in frame order, so
        each row's reference moves on in time), or read by the row's `UserExpressionReader`."""
        todo = [(row, fid, image) for row, w in enumerate(windows) for fid, image in sorted(w.images.items())
                if fid not in known[row]]
        readers = {row for row, ref in enumerate(references) if isinstance(ref, UserExpressionReader)}
        for row in readers:
            mine = [(fid, image) for r, fid, image in todo if r == row]
            if mine:
                reader = references[row]
                assert isinstance(reader, UserExpressionReader)
                latents = reader.latents([image for _, image in mine]).to(self.device, self.dtype)
                learned[row].update(zip([fid for fid, _ in mine], latents, strict=True))
        todo = [item for item in todo if item[0] not in readers]
        mae = self.model.motion_autoencoder
        for i in range(0, len(todo), self.motion_chunk):
            chunk = todo[i:i + self.motion_chunk]
            pixels = normalise_pixels(self.upload_pixels(np.stack([image for _, _, image in chunk])), self.dtype)
            for (row, fid, _), encoded in zip(chunk, mae.encode_motion(pixels), strict=True):
                learned[row][fid] = encoded
        for row, reference in enumerate(references):
            if isinstance(reference, UserReference) and learned[row]:
                fids = sorted(learned[row])
                relative = reference.relative(torch.stack([learned[row][fid] for fid in fids]))
                learned[row].update(zip(fids, relative, strict=True))
        zero = torch.zeros(self.cfg.dim_w, device=self.device, dtype=self.dtype)

        def latent(row: int, fid: int | None) -> torch.Tensor:
            if fid is None:
                return zero
            found = learned[row].get(fid)
            return found if found is not None else known[row].get(fid, zero)

        return torch.stack([torch.stack([latent(row, fid) for fid in w.frame_ids]) for row, w in enumerate(windows)])

    # -- denoise and cache ----------------------------------------------------------------------------------

    def run(self, batch: BatchInputs, bucket: int, timer: StageTimer, *, adjust: Adjust | None = None,
            trace: list[dict] | None = None) -> BatchResult:
        """Denoise the batch's new frames and compute the caches of the next block. Rows are padded with
        inert copies of row 0 up to `bucket` (never returned)."""
        b = batch.x_init.shape[0]
        extra = bucket - b
        with timer("transformer"):
            cond = Conditions(*(pad_rows(t, extra) for t in (batch.cond.wa, batch.cond.wa_user,
                                                             batch.cond.motion_user)))
            cond3 = self.sampler.branch_conditions(cond)
            past = None if batch.past is None else [kv.map(lambda t: pad_branch_rows(t, extra)) for kv in batch.past]
            x_init, r_s, positions = (pad_rows(t, extra) for t in (batch.x_init, batch.r_s, batch.positions))
            record: dict | None = None if trace is None else {
                "x_init": batch.x_init, "c": cond3, "wa_in": batch.cond.wa, "wa_user_in": batch.cond.wa_user,
                "motion_user_in": batch.cond.motion_user}
            x = self.sampler.denoise(x_init, batch.num_context, cond3, r_s, positions, past, record)
            if adjust is not None:
                x = torch.cat([adjust(x[:b]), x[b:]])
        with timer("cache_update"):
            fresh = self.sampler.clean_pass(x, cond3, r_s, positions, past)
            cache = self.sampler.primed_cache(fresh) if past is None else self.sampler.advanced_cache(past, fresh)
            cache = [kv.map(lambda t: unpad_branch_rows(t, b)) for kv in cache]
        if record is not None and trace is not None:
            record["cache_update_x"] = repeat_branches(x[:b])
            record["cache"] = cache
            trace.append(record)
        return BatchResult(x[:b], cache)

    # -- decode ---------------------------------------------------------------------------------------------

    def decode(self, portraits: list[PortraitCode], latents: torch.Tensor, spans: list[tuple[int, int]],
               timer: StageTimer) -> torch.Tensor:
        """Row i's frames latents[i, offset:offset + count] for (offset, count) = spans[i], decoded together
        -> RGB uint8 [B, longest, S, S, 3] on the model's device (rows shorter than the longest repeat their
        last frame; the caller trims)."""
        with timer("decode"):
            longest = max(count for _, count in spans)
            steps = torch.arange(longest, device=latents.device)
            padded = torch.stack([latents[row, offset + steps.clamp(max=count - 1)]
                                  for row, (offset, count) in enumerate(spans)])
            images = self.model.motion_autoencoder.decode_batch(portraits, padded, chunk=self.decode_chunk)
            return to_uint8_tensor(images)

    # -- compilation ----------------------------------------------------------------------------------------

    def precompile(self, buckets: tuple[int, ...], cache_dtype: torch.dtype) -> None:
        """Run every bucket through both phases once on dummy inputs (caches in the pool's dtype, times laid
        out as in live steps), so compiling happens at start-up, not while live sessions wait."""
        c = self.cfg

        def zeros(*shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
            return torch.zeros(shape, device=self.device, dtype=dtype or self.dtype)

        timer = StageTimer()
        for rows in buckets:
            for tokens, past_len in ((c.clip_frames, None), (c.block_tokens, c.self_cache_len)):
                cond = Conditions(zeros(rows, tokens, c.dim_a), zeros(rows, tokens, c.dim_a),
                                  zeros(rows, tokens, c.dim_w))
                past = None if past_len is None else [LayerKV(
                    zeros(3 * rows, c.num_heads, past_len, c.head_dim, dtype=cache_dtype),
                    zeros(3 * rows, c.num_heads, past_len, c.head_dim, dtype=cache_dtype),
                    zeros(3 * rows, c.num_heads, c.cross_cache_len, c.head_dim, dtype=cache_dtype),
                    zeros(3 * rows, c.num_heads, c.cross_cache_len, c.head_dim, dtype=cache_dtype),
                ) for _ in range(c.depth)]
                positions = torch.arange(tokens, device=self.device).expand(rows, -1)
                batch = BatchInputs(zeros(rows, tokens, c.dim_w), 0 if past is None else c.context_frames,
                                    cond, zeros(rows, c.dim_w), positions, past)
                self.run(batch, rows, timer)
