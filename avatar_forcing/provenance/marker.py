"""The engine's frame marker: watermarks (and optionally labels) every decoded frame of every session.

The streaming engine calls `marker(session_ids, frames)` once per step with uint8 frames [B, N, H, W, 3] on
the model's device, right after decoding; each row belongs to one session and carries that session's
payload (the operator's deployment id and the session id's hash).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import cv2
import numpy as np
import torch

from .watermark import DEFAULT_KEY, Payload, embed, grid_for, scheme_for, session_hash

log = logging.getLogger("avatar_forcing.provenance")
LABEL_TEXT = "AI-generated"


class FrameMarker:
    def __init__(self, deployment_id: int = 0, *, watermark: bool = True, visible_label: bool = False,
                 key: str = DEFAULT_KEY, cache_size: int = 64):
        Payload(deployment_id, 0)  # validates the id now, not at the first frame
        self.deployment_id, self.watermark, self.visible_label, self.key = deployment_id, watermark, visible_label, key
        self._patterns: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # (session, H, W, device) -> [H, W]
        self._labels: dict[tuple, torch.Tensor] = {}  # (H, W, device) -> alpha [H, W, 1]
        self._cache_size = cache_size
        if not watermark:
            log.warning("the invisible watermark is OFF: generated video cannot be recognised as AI-made "
                        "(EU AI Act art. 50 asks for a machine-readable mark)")

    def payload(self, session_id: str) -> Payload:
        return Payload(self.deployment_id, session_hash(session_id))

    def __call__(self, session_ids: list[str], frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"expected uint8 frames [B, N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        if len(session_ids) != frames.shape[0]:
            raise ValueError(f"{len(session_ids)} session ids for {frames.shape[0]} rows of frames")
        height, width = frames.shape[2:4]
        if self.visible_label:
            frames = self._burn_label(frames, height, width)
        if self.watermark:
            patterns = torch.stack([self._pattern(sid, height, width, frames.device) for sid in session_ids])
            frames = embed(frames, patterns[:, None])  # one pattern per row, the same for its N frames
        return frames

    def _pattern(self, session_id: str, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = (session_id, height, width, str(device))
        pattern = self._patterns.get(key)
        if pattern is None:
            scheme = scheme_for(grid_for(height, width), self.key)
            pattern = scheme.render(self.payload(session_id), height, width, device)
            self._patterns[key] = pattern
            while len(self._patterns) > self._cache_size:  # sessions end; their patterns go eventually
                self._patterns.popitem(last=False)
        else:
            self._patterns.move_to_end(key)
        return pattern

    def _burn_label(self, frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
        key = (height, width, str(frames.device))
        alpha = self._labels.get(key)
        if alpha is None:
            alpha = torch.from_numpy(label_alpha(height, width)).to(frames.device)[..., None]
            self._labels[key] = alpha
        # White text on a half-dark box: readable on any background.
        box = (alpha > 0).to(torch.float32) * 0.5
        text = (alpha >= 1).to(torch.float32)
        x = frames.to(torch.float32) * (1 - box)
        x = x * (1 - text) + 255.0 * text
        return x.round_().clamp_(0, 255).to(torch.uint8)


def label_alpha(height: int, width: int) -> np.ndarray:
    """A small "AI-generated" label in the bottom-left corner: float32 [H, W], 1 on the text, 0.5 on its box,
    0 elsewhere. Its size follows the frame (about a quarter of the width... at least readable at 128 px)."""
    scale = max(0.25, width / 1400)
    thickness = max(1, round(width / 400))
    (tw, th), base = cv2.getTextSize(LABEL_TEXT, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, round(width / 128))
    alpha = np.zeros((height, width), np.float32)
    top = max(0, height - th - base - 3 * pad)
    alpha[top:height - pad, pad:min(width, pad + tw + 2 * pad)] = 0.5
    text = np.zeros((height, width), np.uint8)
    cv2.putText(text, LABEL_TEXT, (2 * pad, height - base - 2 * pad), cv2.FONT_HERSHEY_SIMPLEX, scale, 255,
                thickness, cv2.LINE_AA)
    alpha[text > 127] = 1.0
    return alpha
