"""The paper's Table 4 from generated vs ground-truth motion, through a pluggable parameter extractor: on
motion latents (below), or on videos through face landmarks (`evaluate_landmarks`, landmarks.py).

An extractor maps one clip's motion latents [T, dim_w] (and its reference code r_s) to per-frame parameters
per group ({"exp": [T, a], "pose": [T, b]}) and, optionally, a mouth-opening series [T] for the lip-sync proxy.
The one here works on motion latents: coordinates along given directions of latent space (the motion
auto-encoder's basis Q, or any known directions, e.g. the synthetic set's), split into groups by index.
Which of the released model's 20 directions are expression and which are pose is not documented: pass the
split you have checked (`--groups`), otherwise all directions are one group, "motion".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import Clip
from .metrics import SID_CLUSTERS, GroupScores, lip_sync, pcc, score_group, speech_envelope


@dataclass
class BasisExtractor:
    basis: np.ndarray  # [k, dim_w]: rows are the directions read out
    groups: dict[str, list[int]] = field(default_factory=dict)  # group -> row indices; empty: one group "motion"
    mouth: int | None = None  # the row whose coordinate is mouth opening (lip-sync proxy)
    relative: bool = True  # subtract the clip's reference code first

    def __post_init__(self) -> None:
        self.basis = np.asarray(self.basis, dtype=np.float64)
        k = self.basis.shape[0]
        if not self.groups:
            self.groups = {"motion": list(range(k))}
        bad = [i for rows in self.groups.values() for i in rows if not 0 <= i < k]
        if bad or (self.mouth is not None and not 0 <= self.mouth < k):
            raise ValueError(f"direction indices must be in [0, {k}): got {bad or [self.mouth]}")

    def coordinates(self, latents: torch.Tensor | np.ndarray, r_s: torch.Tensor | np.ndarray) -> np.ndarray:
        x = np.asarray(latents, dtype=np.float64)
        if self.relative:
            x = x - np.asarray(r_s, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.basis.shape[1]:
            raise ValueError(f"latents {list(x.shape)} do not match the basis width {self.basis.shape[1]}")
        return x @ self.basis.T

    def __call__(self, latents, r_s) -> dict[str, np.ndarray]:
        c = self.coordinates(latents, r_s)
        return {g: c[:, rows] for g, rows in self.groups.items()}

    def mouth_opening(self, latents, r_s) -> np.ndarray | None:
        return None if self.mouth is None else self.coordinates(latents, r_s)[:, self.mouth]


def motion_basis_extractor(direction_weight: torch.Tensor, groups: dict[str, list[int]] | None = None,
                           mouth: int | None = None) -> BasisExtractor:
    """Coordinates in the auto-encoder's basis Q (`dec.direction.basis()`, [dim_w, 20]): r = Q a, so a = Q^T r."""
    return BasisExtractor(np.asarray(direction_weight.detach().double().cpu()).T, groups or {}, mouth)


def parse_groups(text: str) -> dict[str, list[int]]:
    """"exp=0-9,pose=10-19" -> {"exp": [0..9], "pose": [10..19]}."""
    groups: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, spec = part.partition("=")
        if not name or not spec:
            raise ValueError(f"group {part!r}: write NAME=FIRST-LAST or NAME=I (e.g. exp=0-9,pose=10-19)")
        lo, _, hi = spec.partition("-")
        groups.setdefault(name, []).extend(range(int(lo), int(hi or lo) + 1))
    return groups


@dataclass
class Evaluation:
    scores: dict[str, GroupScores]
    lip_sync: tuple[float, float] | None  # mean best correlation, mean lag (frames)
    per_dimension: dict[str, dict[str, np.ndarray]]  # group -> {"rpcc", "var_gen", "var_truth"} per dimension


def evaluate(clips: Sequence[Clip], generated: Sequence[torch.Tensor], extractor, avatar_pcm: Sequence | None = None,
             samples_per_frame: int = 640, seed: int = 0) -> Evaluation:
    """Table-4 scores of `generated` ([T, dim_w] per clip, T may exceed the clip's frames) against the clips'
    ground truth; user parameters come from the clips' user motion (with no reference subtracted)."""
    if len(clips) != len(generated) or not clips:
        raise ValueError(f"{len(clips)} clips but {len(generated)} generated sequences")
    short = [c.name for c, g in zip(clips, generated, strict=True) if len(g) < c.num_frames]
    if short:
        raise ValueError(f"generated sequences shorter than their clips: {', '.join(short[:5])}")
    gen = [extractor(g[:c.num_frames], c.r_s) for c, g in zip(clips, generated, strict=True)]
    truth = [extractor(c.motion, c.r_s) for c in clips]
    user = [extractor(c.user_motion, torch.zeros_like(c.r_s)) for c in clips]
    mouths = None
    if avatar_pcm is not None and getattr(extractor, "mouth", None) is not None:
        mouths = [extractor.mouth_opening(g[:c.num_frames], c.r_s) for c, g in zip(clips, generated, strict=True)]
    return score(user, gen, truth, mouths, avatar_pcm, samples_per_frame, seed)


def score(user: Sequence[dict[str, np.ndarray]], gen: Sequence[dict[str, np.ndarray]],
          truth: Sequence[dict[str, np.ndarray]], mouths: Sequence[np.ndarray] | None = None,
          avatar_pcm: Sequence | None = None, samples_per_frame: int = 640, seed: int = 0) -> Evaluation:
    """The scores from per-clip parameters ({group: [T, k]}) of the user, the generated and the true avatar,
    and (for the lip-sync proxy) the generated mouth opening [T] with the avatar's speech."""
    scores, per_dim = {}, {}
    for group in truth[0]:
        u, g, t = [x[group] for x in user], [x[group] for x in gen], [x[group] for x in truth]
        scores[group] = score_group(u, g, t, SID_CLUSTERS.get(group, 10), seed)
        per_dim[group] = {
            "rpcc": np.mean([np.abs(pcc(a, b) - pcc(a, c)) for a, b, c in zip(u, g, t, strict=True)], axis=0),
            "var_gen": np.mean([x.var(0) for x in g], axis=0),
            "var_truth": np.mean([x.var(0) for x in t], axis=0)}
    sync = None
    if mouths is not None and avatar_pcm is not None:
        pairs = [lip_sync(m, speech_envelope(np.asarray(p), samples_per_frame)[:len(m)])
                 for m, p in zip(mouths, avatar_pcm, strict=True)]
        sync = (float(np.mean([r for r, _ in pairs])), float(np.mean([lag for _, lag in pairs])))
    return Evaluation(scores, sync, per_dim)


@dataclass
class LandmarkClip:
    """One conversation measured on video: face landmarks [T, 468, 3] of the user and of the true avatar, and
    the avatar's speech (16 kHz) for the lip-sync proxy."""

    name: str
    user: np.ndarray
    truth: np.ndarray
    speech: np.ndarray | None = None


def evaluate_landmarks(clips: Sequence[LandmarkClip], generated: Sequence[np.ndarray], extractor,
                       samples_per_frame: int = 640, seed: int = 0) -> Evaluation:
    """Table-4 scores of generated avatar videos' landmarks (one [T', 468, 3] per clip, cut to the clip's
    length) with a fitted `landmarks.LandmarkExtractor` ({"exp", "pose"} per frame, and mouth opening)."""
    if len(clips) != len(generated) or not clips:
        raise ValueError(f"{len(clips)} clips but {len(generated)} generated videos")
    lengths = [min(len(c.user), len(c.truth), len(g)) for c, g in zip(clips, generated, strict=True)]
    user = [extractor(c.user[:n]) for c, n in zip(clips, lengths, strict=True)]
    truth = [extractor(c.truth[:n]) for c, n in zip(clips, lengths, strict=True)]
    gen = [extractor(g[:n]) for g, n in zip(generated, lengths, strict=True)]
    with_speech = all(c.speech is not None for c in clips)
    mouths = [extractor.mouth_opening(g[:n]) for g, n in zip(generated, lengths, strict=True)] if with_speech else None
    return score(user, gen, truth, mouths, [c.speech for c in clips] if with_speech else None, samples_per_frame,
                 seed)


def plot_per_dimension(evaluations: dict[str, Evaluation], path: str | Path) -> Path | None:
    """Bar plots of per-dimension rPCC and variance (generated vs truth) per group; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(next(iter(evaluations.values())).per_dimension)
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3 * len(groups)), squeeze=False)
    width = 0.8 / (len(evaluations) + 1)
    for row, group in enumerate(groups):
        for n, (name, ev) in enumerate(evaluations.items()):
            d = ev.per_dimension[group]
            x = np.arange(len(d["rpcc"]))
            axes[row, 0].bar(x + n * width, d["rpcc"], width, label=name)
            axes[row, 1].bar(x + n * width, d["var_gen"], width, label=name)
        axes[row, 1].bar(x + len(evaluations) * width, d["var_truth"], width, label="ground truth")
        axes[row, 0].set_title(f"{group}: rPCC per dimension (lower is better)")
        axes[row, 1].set_title(f"{group}: variance per dimension")
        axes[row, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
