"""LIA-style motion latent auto-encoder (MODEL_SPEC §2.1).

A portrait is encoded into an identity code `s_r` plus multi-scale feature maps; a motion code is
`r = lambda @ Q^T` where `lambda = fc(s)` and Q is an orthonormal basis. The decoder turns `s_r + r_d` into
a frame by warping the portrait's feature maps with flows predicted level by level.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avatar_forcing.kernels.warp import WARP

from .canonical import USER_REFERENCE_SECONDS, CanonicalCode, UserReference
from .config import MotionAutoencoderConfig
from .stylegan_ops import ConvLayer, EqualConv2d, EqualLinear, ModulatedConv2d, ResBlock, StyledConv, Upsample
from .user_expression import UserExpressionMaps, UserExpressionReader


class EncoderApp(nn.Module):
    """Appearance encoder: image [B,3,S,S] -> code [B,style_dim] and feature maps, 8x8 first."""

    def __init__(self, cfg: MotionAutoencoderConfig):
        super().__init__()
        ch, taps = cfg.channels, cfg.blur_kernel
        convs: list[nn.Module] = [ConvLayer(3, ch[cfg.input_size], 1, taps)]
        in_ch = ch[cfg.input_size]
        for res in reversed(cfg.resolutions()[:-1]):  # input_size/2 ... 4
            convs.append(ResBlock(in_ch, ch[res], taps))
            in_ch = ch[res]
        convs.append(EqualConv2d(in_ch, cfg.style_dim, 4, padding=0, bias=False))
        self.convs = nn.ModuleList(convs)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs = []
        h = image
        for conv in self.convs:
            h = conv(h)
            outputs.append(h)
        # Decoder order: skip the 1x1 code and the 4x4 map, then 8x8 ... full resolution.
        feats = outputs[::-1][2:]
        return h.flatten(1), feats


class MotionEncoder(nn.Module):
    """`enc`: the appearance encoder plus the purely linear motion MLP."""

    def __init__(self, cfg: MotionAutoencoderConfig):
        super().__init__()
        self.net_app = EncoderApp(cfg)
        d = cfg.style_dim
        self.fc = nn.Sequential(*[EqualLinear(d, d) for _ in range(4)], EqualLinear(d, cfg.motion_dim))


class Direction(nn.Module):
    """Orthonormal motion basis Q (QR of the learned [style_dim, motion_dim] matrix)."""

    def __init__(self, cfg: MotionAutoencoderConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cfg.style_dim, cfg.motion_dim))
        # Inference computes the same Q on every encode; keep it while the weight is unchanged (its
        # version counter and storage identify it). Training (autograd on) always recomputes.
        self._basis_cache: tuple[tuple[int, int, torch.device], torch.Tensor] | None = None

    def basis(self) -> torch.Tensor:
        cacheable = torch.is_inference_mode_enabled()
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device)
        if cacheable and self._basis_cache is not None and self._basis_cache[0] == key:
            return self._basis_cache[1]
        # QR is computed in fp32 whatever the autocast state: it is tiny and sensitive.
        q, _ = torch.linalg.qr(self.weight.float() + 1e-8)
        if cacheable:
            self._basis_cache = (key, q)
        return q

    def forward(self, magnitudes: torch.Tensor) -> torch.Tensor:
        """lambda [..., motion_dim] -> r = lambda @ Q^T [..., style_dim]."""
        q = self.basis().to(magnitudes.dtype)
        return magnitudes @ q.t()


class ConstantInput(nn.Module):
    """The decoder's learned 4x4 starting map, repeated over the batch."""

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class ToRGB(nn.Module):
    """1x1 ConvLayer to RGB plus the upsampled RGB of the previous level (not modulated)."""

    def __init__(self, in_channels: int, blur_taps, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_taps)
        self.conv = ConvLayer(in_channels, 3, 1, blur_taps)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        out = self.conv(x) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


def identity_grid(size: int) -> torch.Tensor:
    """[1, size, size, 2] grid_sample coordinates in (x, y) order, as numpy builds them upstream."""
    xs = np.linspace(-1.0, 1.0, size)
    grid = np.stack(np.meshgrid(xs, xs), axis=2)
    return torch.from_numpy(grid).float().unsqueeze(0)


class ToFlow(nn.Module):
    """Predicts a warp grid and a blend mask; warps the portrait's feature map of this level."""

    grid: torch.Tensor  # registered buffer: the identity sampling grid of this level

    def __init__(self, in_channels: int, style_dim: int, resolution: int, blur_taps):
        super().__init__()
        self.upsample = Upsample(blur_taps)
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, blur_taps, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.register_buffer("grid", identity_grid(resolution), persistent=False)

    def forward(self, x: torch.Tensor, style: torch.Tensor, feat: torch.Tensor,
                skip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.conv(x, style) + self.bias
        if skip is not None:
            logits = logits + self.upsample(skip)
        # The warp stays in fp32 under bf16 autocast: an 8-bit mantissa would misplace samples by up to
        # ~2 px of a 512 px frame near its edges.
        logits = logits.float()
        grid = torch.tanh(logits[:, 0:2]).permute(0, 2, 3, 1) + self.grid.float()
        mask = torch.sigmoid(logits[:, 2:3])
        with torch.autocast(grid.device.type, enabled=False):
            warped = WARP.choose(grid.device)(feat.float(), grid) * mask
        blended = warped + x * (1 - mask)
        return warped, blended, logits, grid


class PortraitCode(NamedTuple):
    """What the model keeps of a portrait: identity code, warp sources and its own motion."""

    s_r: torch.Tensor  # [1, style_dim]
    feats: list[torch.Tensor]  # decoder-order feature maps, 8x8 first, batch 1
    r_s: torch.Tensor  # [1, style_dim] reference motion (the transformer's r_s)
    # With `portrait_detail`: the portrait minus the decoding of its own motion [1, 3, S, S], and that
    # decoding's warp grid [1, R, R, 2] (R: flow_resolution).
    detail: torch.Tensor | None = None
    detail_grid: torch.Tensor | None = None


class DecodedFrames(NamedTuple):
    """Decoder output: raw images and the warp grid of the `flow_resolution` level."""

    image: torch.Tensor  # [B, 3, S, S], raw (no tanh, no clamp)
    flow: torch.Tensor | None  # [B, R, R, 2] warp grid of the `flow_resolution` level


class Synthesis(nn.Module):
    """`dec`: the flow-warping style decoder, plus the motion basis (`direction`)."""

    def __init__(self, cfg: MotionAutoencoderConfig):
        super().__init__()
        ch, taps, d = cfg.channels, cfg.blur_kernel, cfg.style_dim
        self.flow_resolution = cfg.flow_resolution
        self.direction = Direction(cfg)
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, d, taps)
        # Present in the checkpoints but never used by the forward pass.
        self.to_rgb1 = ToRGB(ch[4], taps, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.to_flows = nn.ModuleList()
        in_ch = ch[4]
        for res in cfg.resolutions()[1:]:
            out_ch = ch[res]
            self.convs.append(StyledConv(in_ch, out_ch, 3, d, taps, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, 3, d, taps))
            self.to_rgbs.append(ToRGB(out_ch, taps))
            self.to_flows.append(ToFlow(out_ch, d, res, taps))
            in_ch = out_ch

    def forward(self, latent: torch.Tensor, feats: list[torch.Tensor]) -> DecodedFrames:
        """latent [B, style_dim] (s_r + r_d); feats: the portraits' maps, 8x8 first, with batch S dividing B:
        frames b*B/S .. (b+1)*B/S - 1 belong to portrait b (one portrait: S = 1)."""
        batch = latent.shape[0]
        if batch % feats[0].shape[0]:
            raise ValueError(f"{batch} frames cannot be split evenly over {feats[0].shape[0]} portraits")
        out = self.conv1(self.input(batch).to(latent.dtype), latent)
        rgb: torch.Tensor | None = None
        flow_logits = flow = None
        for level, (to_rgb, to_flow) in enumerate(zip(self.to_rgbs, self.to_flows, strict=True)):
            out = self.convs[2 * level](out, latent)
            out = self.convs[2 * level + 1](out, latent)
            warped, out, flow_logits, grid = to_flow(out, latent, feats[level], flow_logits)
            rgb = to_rgb(warped, rgb)
            if out.shape[-1] == self.flow_resolution:
                flow = grid
        if rgb is None:
            raise ValueError("the decoder has no levels: check the motion auto-encoder's channel table")
        return DecodedFrames(rgb, flow)


class MotionAutoencoder(nn.Module):
    """LIA-style auto-encoder: a face image -> appearance code, feature maps and motion latent; appearance
    code + motion latent -> a frame, by flow-warping the portrait's feature maps (MODEL_SPEC §2.1)."""

    def __init__(self, cfg: MotionAutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.enc = MotionEncoder(cfg)
        self.dec = Synthesis(cfg)
        self.canonical = CanonicalCode(cfg.style_dim) if cfg.canonical_code else None
        self.user_expression = UserExpressionMaps(cfg.style_dim) if cfg.user_expression else None

    def encode_appearance(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image in [-1, 1] -> (s_r [B, style_dim], feature maps)."""
        return self.enc.net_app(image)

    def motion_of_code(self, code: torch.Tensor) -> torch.Tensor:
        """Appearance code -> absolute motion latent r = fc(code) @ Q^T."""
        return self.dec.direction(self.enc.fc(code))

    def encode_motion(self, images: torch.Tensor) -> torch.Tensor:
        """Frames [N,3,S,S] in [-1, 1] -> motion latents [N, style_dim] (the user's r_d)."""
        code, _ = self.enc.net_app(images)
        return self.motion_of_code(code)

    def encode_portrait(self, image: torch.Tensor) -> PortraitCode:
        """One portrait [1,3,S,S] in [-1, 1] -> its code."""
        s_r, feats = self.encode_appearance(image)
        return self._portrait_code(image, s_r, feats, self.motion_of_code(s_r))

    def _portrait_code(self, image: torch.Tensor, s_r: torch.Tensor, feats: list[torch.Tensor],
                       r_s: torch.Tensor) -> PortraitCode:
        """The code that decodes `image` from these maps with s_r + r_s: with `portrait_detail`, plus what that
        decoding misses of the image and its warp grid."""
        if not self.config.portrait_detail:
            return PortraitCode(s_r, feats, r_s)
        own = self.dec(s_r + r_s, feats)
        return PortraitCode(s_r, feats, r_s, (image - own.image).float(), own.flow)

    def animation_code(self, image: torch.Tensor) -> PortraitCode:
        """One portrait [1,3,S,S] in [-1, 1] -> the code it is animated with: its own (`encode_portrait`), or
        with `canonical_code` the training faces' codes around its own feature maps and detail (canonical.py)."""
        if self.canonical is None:
            return self.encode_portrait(image)
        self.canonical.require_set()
        _, feats = self.encode_appearance(image)
        return self._portrait_code(image, self.canonical.appearance.to(image.dtype), feats,
                                   self.canonical.motion.to(image.dtype))

    def user_reference(self, fps: float) -> UserReference | UserExpressionReader | None:
        """What one user's webcam crops go through, fresh per user: with `relative_user_motion` a running
        reference for their encoded codes; with `user_expression` a reader that makes their latents from the
        face mesh instead of the encoder; else None (the encoded codes are used as they are)."""
        if self.canonical is None:
            return None
        horizon = max(1, round(USER_REFERENCE_SECONDS * fps))
        if self.user_expression is not None:
            self.canonical.require_set()
            self.user_expression.require_set()
            return UserExpressionReader(self.user_expression, self.canonical.motion, horizon)
        if not self.config.relative_user_motion:
            return None
        self.canonical.require_set()
        return UserReference(self.canonical.motion, horizon)

    def decode(self, latent: torch.Tensor, feats: list[torch.Tensor]) -> DecodedFrames:
        return self.dec(latent, feats)

    def with_detail(self, frames: DecodedFrames, detail: torch.Tensor, detail_grid: torch.Tensor) -> torch.Tensor:
        """Raw frames [N, 3, S, S] plus their portraits' detail [N, 3, S, S], each moved by how far the frame's
        warp differs from the warp that decoded the portrait itself ([N, R, R, 2] both): where the face moved,
        its detail moves with it; the portrait's own motion gets the portrait back exactly."""
        if frames.flow is None:
            raise ValueError("portrait_detail needs the decoder's warp grid at flow_resolution")
        shift = (frames.flow.float() - detail_grid.float()).permute(0, 3, 1, 2)
        size = self.config.input_size
        shift = F.interpolate(shift, size=(size, size), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
        finest = self.dec.to_flows[-1]
        assert isinstance(finest, ToFlow)
        identity = finest.grid.float()  # the finest level's identity grid: the frame size
        with torch.autocast(shift.device.type, enabled=False):
            moved = F.grid_sample(detail, identity + shift, mode="bilinear", padding_mode="border",
                                  align_corners=True)
        return frames.image + moved.to(frames.image.dtype)

    def _images(self, out: DecodedFrames, portraits: list[PortraitCode], frames_each: int) -> torch.Tensor:
        """The decoder's frames of these portraits (`frames_each` consecutive frames per portrait), with their
        detail where the portraits carry it."""
        details = [q.detail for q in portraits]
        grids = [q.detail_grid for q in portraits]
        if any(d is None for d in details) or any(g is None for g in grids):
            return out.image
        return self.with_detail(out, torch.cat(details).repeat_interleave(frames_each, 0),  # type: ignore[arg-type]
                                torch.cat(grids).repeat_interleave(frames_each, 0))  # type: ignore[arg-type]

    def decode_frames(self, portrait: PortraitCode, r_d: torch.Tensor, chunk: int = 10) -> torch.Tensor:
        """Motion latents r_d [N, style_dim] of one portrait -> raw frames [N, 3, S, S], `chunk` at a time."""
        pieces = []
        for i in range(0, r_d.shape[0], chunk):
            latents = r_d[i:i + chunk]
            pieces.append(self._images(self.dec(portrait.s_r + latents, portrait.feats), [portrait], len(latents)))
        return torch.cat(pieces)

    def decode_batch(self, portraits: list[PortraitCode], r_d: torch.Tensor, chunk: int = 10) -> torch.Tensor:
        """Frames of several portraits at once: r_d [P, F, style_dim] (F frames of portrait p) ->
        [P, F, 3, S, S], at most `chunk` frames per decoder call: several whole portraits per call when
        their frames fit, else one portrait's frames `chunk` at a time (calls of one steady size also
        keep the allocator from fragmenting)."""
        p, f = r_d.shape[:2]
        if f > chunk:
            return torch.stack([self.decode_frames(q, r_d[i], chunk) for i, q in enumerate(portraits)])
        per_call = chunk // f
        pieces = []
        for i in range(0, p, per_call):
            group = portraits[i:i + per_call]
            s_r = torch.cat([q.s_r for q in group]).repeat_interleave(f, 0)
            feats = group[0].feats if len(group) == 1 else [  # (a cat of one tensor would still copy it)
                torch.cat([q.feats[level] for q in group]) for level in range(len(group[0].feats))]
            pieces.append(self._images(self.dec(s_r + r_d[i:i + per_call].flatten(0, 1), feats), group, f))
        return torch.cat(pieces).unflatten(0, (p, f))
