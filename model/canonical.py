"""Animating a face the auto-encoder was not trained on (`canonical_code`, ours; off in the reference).

A motion auto-encoder trained on few faces (the built-in model's: looks of one portrait) reads an unseen face as
a code far from every code it learnt from: its decoder then warps that face out of shape and the transformer,
conditioned on that code, makes motion it never saw. With `canonical_code` each portrait is animated in the
training faces' code instead:

- the decoder reads the training faces' mean appearance code and mean motion code (the `CanonicalCode`
  buffers), so its style and warps are those it was trained to make; the portrait brings its feature maps,
  which the warps move, and its own detail (`portrait_detail`), which puts the portrait itself back;
- the transformer's reference motion r_s is the canonical motion code, so it generates motion it knows;
- with `relative_user_motion` too, the user's webcam codes reach the transformer as (their code - their running
  mean) + the canonical motion (`UserReference`): what the user does, not who they are.

Measured in docs/training.md §6 (an unseen portrait: lip sync 0.00 -> 0.71-0.84, first-frame identity 0.56 ->
0.92-0.96).
"""

from __future__ import annotations

import torch
from torch import nn

# The user's resting code is their mean code over about this long: long next to a nod or a smile (which must
# stay in the relative motion), short next to a session (the user may sit back or turn the camera).
USER_REFERENCE_SECONDS = 30.0
# Training commands accept a checkpoint without the canonical buffers (`load_model(start_fresh=...)`): they stay
# zero until `train canonical-code` sets them, and serving refuses them until then.
EXTENSION_BUFFERS = ("canonical",)


class CanonicalCode(nn.Module):
    """The training faces' mean appearance code and mean motion code ([1, style_dim] each), kept in the
    checkpoint (`motion_autoencoder.canonical.*`). Zero until `set_from` is called: a model whose buffers were
    never set refuses to animate (`require_set`)."""

    appearance: torch.Tensor
    motion: torch.Tensor

    def __init__(self, style_dim: int):
        super().__init__()
        self.register_buffer("appearance", torch.zeros(1, style_dim))
        self.register_buffer("motion", torch.zeros(1, style_dim))

    @torch.no_grad()
    def set_from(self, appearance_codes: torch.Tensor, motion_codes: torch.Tensor) -> None:
        """Means of the training faces' codes [N, style_dim] each (s_r and r_s of their portraits)."""
        if appearance_codes.ndim != 2 or appearance_codes.shape != motion_codes.shape or not len(appearance_codes):
            raise ValueError(f"expected two [N, {self.appearance.shape[1]}] code tensors, got "
                             f"{list(appearance_codes.shape)} and {list(motion_codes.shape)}")
        self.appearance.copy_(appearance_codes.float().mean(0, keepdim=True))
        self.motion.copy_(motion_codes.float().mean(0, keepdim=True))

    def require_set(self) -> None:
        if not (self.appearance.any() or self.motion.any()):
            raise ValueError("this checkpoint's canonical code was never set (its motion_autoencoder.canonical.* "
                             "buffers are zero): make it with `avatar-forcing train canonical-code`")


class UserReference:
    """One user's running resting code: each new webcam code becomes (code - the mean of the codes so far, over
    at most `horizon` frames) + the canonical motion. The first frame is therefore the canonical rest, and a
    face that keeps still stays there whoever it is."""

    def __init__(self, canonical_motion: torch.Tensor, horizon: int):
        if horizon < 1:
            raise ValueError(f"the reference horizon must be at least one frame, not {horizon}")
        self.canonical = canonical_motion.reshape(-1)
        self.horizon = horizon
        self.mean: torch.Tensor | None = None
        self.frames = 0

    def relative(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [N, D] in time order -> relative codes [N, D]; the reference moves on with each."""
        out = torch.empty_like(codes)
        for i, code in enumerate(codes):
            self.frames += 1
            if self.mean is None:
                self.mean = code.float().clone()
            else:  # the mean of all frames until `horizon`, then an average that forgets over `horizon` frames
                self.mean += (code.float() - self.mean) / min(self.frames, self.horizon)
            out[i] = (code.float() - self.mean + self.canonical.float()).to(codes.dtype)
        return out
