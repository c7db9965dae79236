"""The paper's listening-behaviour metrics (Table 4, after Learning-to-Listen) and a lip-sync proxy.

Every metric takes per-frame parameters [T, d] (one group: expression or pose) of several sequences and
never returns NaN: a constant series has no correlation (PCC 0), one cluster has entropy 0, silence has no
envelope to follow (correlation 0).

  rPCC  mean over dims of |PCC(user_d, generated_d) - PCC(user_d, truth_d)|, per sequence, then averaged:
        how far the generated reaction to the user is from the true one (lower is better)
  SID   k-means on the ground-truth frames; entropy (nats) of the generated frames' cluster histogram
        (higher = more diverse). Cluster counts follow L2L as we read it: 15 expression, 9 pose.
  Var   variance over time per dim, averaged over dims and sequences (higher = livelier)
  FD    Frechet distance between Gaussians fitted to all ground-truth and all generated frames
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SID_CLUSTERS = {"exp": 15, "pose": 9}


def _as_2d(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{what}: expected [frames, dims], got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return x


def pcc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-column Pearson correlation of [T, d] arrays; 0 where either column is constant."""
    a, b = _as_2d(a, "pcc a"), _as_2d(b, "pcc b")
    if a.shape != b.shape:
        raise ValueError(f"pcc: shapes {list(a.shape)} and {list(b.shape)} differ")
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    num = (a * b).sum(0)
    tiny = 1e-12 * max(1.0, float(denom.max(initial=0)))
    return np.divide(num, denom, out=np.zeros_like(num), where=denom > tiny)


def rpcc(user: Sequence[np.ndarray], generated: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    _same_count(user, generated, truth)
    per_sequence = [np.abs(pcc(u, g) - pcc(u, t)).mean() for u, g, t in zip(user, generated, truth, strict=True)]
    return float(np.mean(per_sequence))


def variance(sequences: Sequence[np.ndarray]) -> float:
    return float(np.mean([_as_2d(x, "variance").var(0).mean() for x in sequences]))


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = 100) -> np.ndarray:
    """Centroids [k', d] (k' <= k: no more clusters than distinct points) by Lloyd's algorithm, k-means++ start."""
    x = _as_2d(x, "kmeans")
    distinct = np.unique(x, axis=0)
    k = min(k, len(distinct))
    rng = np.random.default_rng(seed)
    centers = [distinct[rng.integers(len(distinct))]]
    for _ in range(1, k):
        d2 = ((distinct[:, None] - np.array(centers)[None]) ** 2).sum(-1).min(1)
        centers.append(distinct[rng.choice(len(distinct), p=d2 / d2.sum())])
    c = np.array(centers)
    for _ in range(iterations):
        labels = assign(x, c)
        new = np.array([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(len(c))])
        if np.allclose(new, c):
            break
        c = new
    return c


def assign(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return ((x[:, None] - centers[None]) ** 2).sum(-1).argmin(1)


def entropy(labels: np.ndarray, k: int) -> float:
    p = np.bincount(labels, minlength=k) / max(1, len(labels))
    p = p[p > 0]
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: -0.0 for one cluster reads oddly


def sid(generated: Sequence[np.ndarray], truth: Sequence[np.ndarray], clusters: int, seed: int = 0) -> float:
    centers = kmeans(np.concatenate([_as_2d(t, "sid truth") for t in truth]), clusters, seed)
    gen = np.concatenate([_as_2d(g, "sid generated") for g in generated])
    return entropy(assign(gen, centers), len(centers))


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(generated: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2); symmetric square roots keep it real."""
    a = np.concatenate([_as_2d(t, "fd truth") for t in truth])
    b = np.concatenate([_as_2d(g, "fd generated") for g in generated])
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False, bias=True))
    s_b = np.atleast_2d(np.cov(b, rowvar=False, bias=True))
    root_a = _sqrt_psd(s_a)
    cross = _sqrt_psd(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross))


def speech_envelope(pcm: np.ndarray, samples_per_frame: int) -> np.ndarray:
    """RMS per video frame of a mono waveform (frames = len // samples_per_frame)."""
    pcm = np.asarray(pcm, dtype=np.float64)
    frames = len(pcm) // samples_per_frame
    return np.sqrt((pcm[:frames * samples_per_frame].reshape(frames, samples_per_frame) ** 2).mean(1))


def lip_sync(mouth_opening: np.ndarray, envelope: np.ndarray, max_lag: int = 5) -> tuple[float, int]:
    """(best correlation, its lag in frames) of mouth opening against the speech envelope; a positive lag
    means the mouth follows the audio. Needs no network; 0 correlation on silence or a still mouth."""
    m = np.asarray(mouth_opening, dtype=np.float64).ravel()
    e = np.asarray(envelope, dtype=np.float64).ravel()
    n = min(len(m), len(e))
    if n <= 2 * max_lag + 2:
        raise ValueError(f"lip_sync: {n} frames is too short for lags of +-{max_lag}")
    best = (0.0, 0)
    for lag in range(-max_lag, max_lag + 1):
        mm = m[max(lag, 0):n + min(lag, 0)]
        ee = e[max(-lag, 0):n - max(lag, 0)]
        r = float(pcc(mm, ee)[0])
        if r > best[0]:
            best = (r, lag)
    return best


@dataclass
class GroupScores:
    rpcc: float
    sid: float
    var: float
    fd: float


def score_group(user: Sequence[np.ndarray], generated: Sequence[np.ndarray], truth: Sequence[np.ndarray],
                clusters: int, seed: int = 0) -> GroupScores:
    _same_count(user, generated, truth)
    return GroupScores(rpcc(user, generated, truth), sid(generated, truth, clusters, seed), variance(generated),
                       frechet_distance(generated, truth))


def table(rows: dict[str, dict[str, GroupScores]], groups: Sequence[str] = ("exp", "pose")) -> str:
    """A text table like the paper's Table 4: one row per model, rPCC / SID / Var / FD per group."""
    head = ["model"] + [f"{m}-{g}" for m in ("rPCC", "SID", "Var", "FD") for g in groups]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, scores in rows.items():
        cells = [name] + [f"{getattr(scores[g], m):.3f}" for m in ("rpcc", "sid", "var", "fd") for g in groups]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _same_count(*lists: Sequence[np.ndarray]) -> None:
    counts = {len(x) for x in lists}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"need the same, non-zero number of sequences for user / generated / truth, got {counts}")
