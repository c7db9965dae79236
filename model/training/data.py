"""Training clips, their shards on disk, and the deterministic windows a training step reads.

A clip is one dyadic conversation seen from the avatar's side, every tensor per video frame (25 fps):

    motion       [T, dim_w]  the avatar's motion latents (the ground truth the transformer learns)
    r_s          [dim_w]     the reference frame's motion code
    audio        [T, F]      the avatar's stacked wav2vec2 features (before `audio_projection`)
    user_audio   [T, F]      the user's, likewise
    user_motion  [T, dim_w]  the user's motion latents
    loser        [T, dim_w]  optional: latents a model generated for this clip (DPO)

Audio is stored as the frozen backbone's stacked layer outputs rather than the projected features:
wav2vec2 never trains, so caching its output removes almost all of the per-step compute, while
`audio_projection` (part of the released transformer checkpoint) still trains.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FIELDS = ("motion", "audio", "user_audio", "user_motion")  # per-frame tensors every clip has
INDEX_NAME = "index.json"


@dataclass
class Clip:
    name: str
    motion: torch.Tensor
    r_s: torch.Tensor
    audio: torch.Tensor
    user_audio: torch.Tensor
    user_motion: torch.Tensor
    loser: torch.Tensor | None = None

    @property
    def num_frames(self) -> int:
        return self.motion.shape[0]

    def check(self, dim_w: int, audio_features: int) -> None:
        """Shapes against the model configuration; raises ValueError naming the clip and the tensor."""
        want = {"motion": (self.num_frames, dim_w), "audio": (self.num_frames, audio_features),
                "user_audio": (self.num_frames, audio_features), "user_motion": (self.num_frames, dim_w)}
        if self.loser is not None:
            want["loser"] = (self.num_frames, dim_w)
        for key, shape in want.items():
            got = tuple(getattr(self, key).shape)
            if got != shape:
                raise ValueError(f"clip {self.name}: {key} has shape {list(got)}, expected {list(shape)} "
                                 f"(the model's dim_w={dim_w}, stacked audio features={audio_features})")
        if tuple(self.r_s.shape) != (dim_w,):
            raise ValueError(f"clip {self.name}: r_s has shape {list(self.r_s.shape)}, expected [{dim_w}]")


@dataclass
class WindowBatch:
    """B windows of L frames, stacked: motion [B, L, D], r_s [B, D], audio [B, L, F], ..."""

    motion: torch.Tensor
    r_s: torch.Tensor
    audio: torch.Tensor
    user_audio: torch.Tensor
    user_motion: torch.Tensor
    loser: torch.Tensor | None
    keys: torch.Tensor  # [B] int64: each window's position in the global batch (seeds its randomness)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> WindowBatch:
        move = lambda t: t.to(device, dtype)
        return WindowBatch(move(self.motion), move(self.r_s), move(self.audio), move(self.user_audio),
                           move(self.user_motion), None if self.loser is None else move(self.loser), self.keys)

    @property
    def size(self) -> int:
        return self.motion.shape[0]


class WindowSet:
    """All windows of `length` frames (starting every `stride` frames) of a list of clips.

    The order of windows is a seeded permutation per epoch; step s reads global positions
    [s * G, (s + 1) * G) of the endless sequence of epochs, G being the global batch. A rank / micro-batch
    reads its own slice of that batch, so any split of the same global batch over processes sees exactly
    the same windows (the DDP test relies on it).
    """

    def __init__(self, clips: Sequence[Clip], length: int, stride: int, seed: int = 0):
        if not clips:
            raise ValueError("no training clips")
        short = [c.name for c in clips if c.num_frames < length]
        if short:
            raise ValueError(f"{len(short)} clips are shorter than a training window of {length} frames: "
                             f"{', '.join(short[:5])}")
        self.clips = list(clips)
        self.length = length
        self.windows = [(i, s) for i, c in enumerate(self.clips) for s in range(0, c.num_frames - length + 1, stride)]
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def has_losers(self) -> bool:
        return all(c.loser is not None for c in self.clips)

    def _window_at(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, len(self.windows))
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms = {epoch: torch.randperm(len(self.windows), generator=gen)}  # keep one epoch
        return self.windows[int(self._perms[epoch][offset])]

    def batch(self, step: int, global_batch: int, first: int, count: int) -> WindowBatch:
        """Positions first .. first + count - 1 of step `step`'s global batch."""
        if first < 0 or first + count > global_batch:
            raise ValueError(f"slice [{first}, {first + count}) outside a global batch of {global_batch}")
        rows = [self._window_at(step * global_batch + j) for j in range(first, first + count)]
        pick = lambda key: torch.stack([getattr(self.clips[i], key)[s:s + self.length] for i, s in rows])
        loser = pick("loser") if self.has_losers else None
        return WindowBatch(pick("motion"), torch.stack([self.clips[i].r_s for i, _ in rows]), pick("audio"),
                           pick("user_audio"), pick("user_motion"), loser,
                           torch.arange(first, first + count, dtype=torch.int64))


# -- shards -------------------------------------------------------------------------------------------------


class ShardWriter:
    """Appends clips to a shard folder, one shard per `clips_per_shard` clips; the index is rewritten (atomically)
    after every shard, so an interrupted run keeps every finished shard and `done` tells a rerun what to skip.
    Clips recorded as rejected (`reject`) are kept in the index with the reason and skipped as well."""

    def __init__(self, folder: str | Path, clips_per_shard: int = 64):
        if clips_per_shard < 1:
            raise ValueError("clips_per_shard must be >= 1")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.clips_per_shard = clips_per_shard
        index_path = self.folder / INDEX_NAME
        index = json.loads(index_path.read_text()) if index_path.exists() else {}
        self.entries: dict[str, dict] = index.get("clips", {})
        self.rejected: dict[str, str] = index.get("rejected", {})
        self.pending: list[Clip] = []
        self.next_shard = 1 + max((int(e["shard"][6:11]) for e in self.entries.values()), default=-1)

    @property
    def done(self) -> set[str]:
        return set(self.entries) | set(self.rejected)

    def add(self, clip: Clip) -> None:
        if clip.name in self.entries or any(c.name == clip.name for c in self.pending):
            raise ValueError(f"clip {clip.name} is already in {self.folder}")
        self.pending.append(clip)
        if len(self.pending) == self.clips_per_shard:
            self.flush()

    def reject(self, name: str, reason: str) -> None:
        self.rejected[name] = reason
        self._write_index()

    def flush(self) -> None:
        if not self.pending:
            return
        shard = f"shard-{self.next_shard:05d}.safetensors"
        tensors = {}
        for clip in self.pending:
            for key in (*FIELDS, "r_s", "loser"):
                value = getattr(clip, key)
                if value is not None:
                    tensors[f"{clip.name}/{key}"] = value.contiguous()
        tmp = self.folder / (shard + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(self.folder / shard)
        for clip in self.pending:
            self.entries[clip.name] = {"shard": shard, "frames": clip.num_frames}
        self.pending, self.next_shard = [], self.next_shard + 1
        self._write_index()

    def _write_index(self) -> None:
        payload = {"format": 1, "clips": self.entries}
        if self.rejected:
            payload["rejected"] = self.rejected
        tmp = self.folder / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(self.folder / INDEX_NAME)


def save_shards(clips: Sequence[Clip], folder: str | Path, clips_per_shard: int = 64) -> Path:
    """Write clips as safetensors shards plus an index (clip -> shard, frames) into an empty or new folder."""
    writer = ShardWriter(folder, clips_per_shard)
    if writer.entries:
        raise ValueError(f"{folder} already holds shards: write into a new folder")
    for clip in clips:
        writer.add(clip)
    writer.flush()
    return writer.folder / INDEX_NAME


def load_shards(folder: str | Path, dtype: torch.dtype = torch.float32) -> list[Clip]:
    """Every clip of a shard folder, in index order."""
    folder = Path(folder)
    try:
        index = json.loads((folder / INDEX_NAME).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder / INDEX_NAME} not found: not a training shard folder "
                                "(make one with `avatar-forcing data prepare`)") from None
    shards: dict[str, dict[str, torch.Tensor]] = {}
    clips = []
    for name, entry in index["clips"].items():
        if entry["shard"] not in shards:
            shards[entry["shard"]] = load_file(str(folder / entry["shard"]))
        tensors = shards[entry["shard"]]
        own = {key: tensors[f"{name}/{key}"].to(dtype) for key in (*FIELDS, "r_s", "loser")
               if f"{name}/{key}" in tensors}
        missing = [k for k in (*FIELDS, "r_s") if k not in own]
        if missing:
            raise ValueError(f"{folder / entry['shard']}: clip {name} lacks {', '.join(missing)}")
        clips.append(Clip(name, **own))
    return clips
