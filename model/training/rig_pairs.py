"""Auto-encoder training pairs rendered on the fly by the face rig, with the expression behind each frame.

Two frames of one rigged look, each with its own random expression (jaw, smile, lip rounding, blink, brows,
head yaw / pitch / roll): the pair a `FramePairs` clip would give, plus the driving frame's expression as
numbers. The objective's `code` term makes the first motion magnitudes (lambda) equal those numbers
(scaled to about [-1, 1]), so the motion encoder separates expressions from the first steps instead of
after the tens of thousands a from-scratch LIA needs (measured: after 2000 steps of the image losses alone,
an open jaw moved lambda by 1 % of its norm and the decoder's output by nothing).

Pair j of step s is drawn from a generator keyed by (seed, s, j), like `FramePairs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import numpy as np
import torch

from .autoencoder import PairBatch
from .flow_matching import window_generator
from .rig import Expression, FaceRig

CODE_FIELDS = tuple(f.name for f in fields(Expression))
# Each field's typical extent (degrees for the head): dividing by it puts the code in about [-1, 1].
CODE_SCALE = {"jaw": 1.0, "smile": 1.0, "rounding": 1.0, "blink": 1.0, "brows": 1.0,
              "yaw": 20.0, "pitch": 15.0, "roll": 10.0}


def random_expression(rng: np.random.Generator) -> Expression:
    """Conversation-like expressions: often a parted mouth, sometimes a smile or a blink, small head turns."""
    on = lambda p: rng.random() < p
    return Expression(
        jaw=float(rng.uniform(0.05, 0.8)) if on(0.6) else 0.0,
        smile=float(rng.uniform(0.1, 1.0)) if on(0.4) else 0.0,
        rounding=float(rng.uniform(0.1, 0.8)) if on(0.2) else 0.0,
        blink=float(rng.uniform(0.3, 1.0)) if on(0.15) else 0.0,
        brows=float(rng.uniform(-1.0, 1.0)) if on(0.3) else 0.0,
        yaw=float(np.clip(rng.normal(0, 8), -20, 20)),
        pitch=float(np.clip(rng.normal(0, 6), -15, 15)),
        roll=float(np.clip(rng.normal(0, 4), -10, 10)),
    )


def expression_code(e: Expression) -> np.ndarray:
    return np.array([getattr(e, name) / CODE_SCALE[name] for name in CODE_FIELDS], dtype=np.float32)


class RigPairs:
    """Random (source, driving) pairs rendered from rigged looks (each an S x S face crop's `FaceRig`)."""

    def __init__(self, rigs: Sequence[FaceRig], seed: int = 0):
        if not rigs:
            raise ValueError("no rigged looks to render pairs from")
        sizes = {rig.portrait.shape for rig in rigs}
        if len(sizes) != 1:
            raise ValueError(f"all looks must be one size, got {sorted(sizes)}")
        self.rigs = list(rigs)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rigs)

    def pair(self, step: int, key: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(source frame, driving frame, the driving expression's code, where the mouth is on either frame)."""
        gen = window_generator(self.seed, step, key)
        rig = self.rigs[int(torch.randint(0, len(self.rigs), (1,), generator=gen))]
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        source, driving = random_expression(rng), random_expression(rng)
        mouth = rig.mouth_region(source) | rig.mouth_region(driving)
        return rig.render(source), rig.render(driving), expression_code(driving), mouth

    def batch(self, step: int, global_batch: int, first: int, count: int) -> PairBatch:
        if first < 0 or first + count > global_batch:
            raise ValueError(f"slice [{first}, {first + count}) outside a global batch of {global_batch}")
        picks = [self.pair(step, j) for j in range(first, first + count)]
        as_chw = lambda frames: torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
        return PairBatch(as_chw([p[0] for p in picks]), as_chw([p[1] for p in picks]),
                         torch.arange(first, first + count, dtype=torch.int64),
                         torch.from_numpy(np.stack([p[2] for p in picks])),
                         torch.from_numpy(np.stack([p[3] for p in picks]))[:, None].to(torch.uint8))
