"""Training of the motion auto-encoder (LIA) on frame pairs of one clip.

A pair is two face crops of the same clip: the source gives the appearance (code s_r and the encoder's
feature maps), the driving frame gives the motion r_d = Q fc(net_app(driving)); the decoder must rebuild the
driving frame from s_r + r_d and the source's maps, exactly the algebra inference uses (MODEL_SPEC §2.1).
Because both frames show the same person, the only way to succeed is to move the motion into r_d.

Loss (all on images in [-1, 1]):
    L1(recon, driving)
  + w_ssim   (1 - SSIM(recon, driving))            structure, 11x11 Gaussian window, on [0, 1] images
  + w_grad   multi-scale L1 of image gradients      edges at full, 1/2 and 1/4 resolution
  + w_percep L1 of a perceptual network's features  only when a network is given (a local TorchScript file)
  + w_moving L1 where source and driving differ       (`moving_l1`)
  + w_mouth  L1 inside the mouth region               rig-rendered pairs only (`region_l1`, `PairBatch.mouth`)
LIA's adversarial term is left out: it needs a discriminator trained alongside, and the released weights
are a better start for fine-tuning than anything a GAN on a few clips would give.

The trained module holds the auto-encoder's own `enc` and `dec`, so its state-dict names are the
auto-encoder's and the export adds the official `motion_autoencoder.` prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..avatar_forcing import AvatarForcing
from ..checkpoint_file import write_safetensors
from ..motion_autoencoder import MotionAutoencoder, ToFlow
from ..stylegan_ops import EqualLinear, ModulatedConv2d
from .flow_matching import window_generator

PREFIX = "motion_autoencoder."
AUTOENCODER_NAME = "motion_autoencoder.safetensors"  # the auto-encoder alone, as the official file
MODEL_NAME = "model.safetensors"  # the whole model (loads with `--weights FILE`)


class Reconstruction(nn.Module):
    """source, driving [B, 3, S, S] in [-1, 1] -> the driving frame rebuilt from the source's appearance."""

    def __init__(self, autoencoder: MotionAutoencoder):
        super().__init__()
        self.enc = autoencoder.enc
        self.dec = autoencoder.dec

    def forward(self, source: torch.Tensor, driving: torch.Tensor, with_magnitudes: bool = False,
                known: torch.Tensor | None = None,
                forced: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The rebuilt frame; with `with_magnitudes`, also the driving frame's motion magnitudes (lambda).
        Teacher forcing: for the pairs marked in `forced` [B] the decoder gets `known` [B, K] as the first K
        magnitudes instead of the encoder's, so it learns what they mean while the encoder learns to
        predict them (the code loss)."""
        b = source.shape[0]
        codes, feats = self.enc.net_app(torch.cat([source, driving]))  # one encoder call for both
        s_r = codes[:b]
        magnitudes = self.enc.fc(codes[b:])
        decoded = magnitudes
        if known is not None and forced is not None:
            k = known.shape[1]
            first = torch.where(forced[:, None], known.to(magnitudes.dtype), magnitudes[:, :k])
            decoded = torch.cat([first, magnitudes[:, k:]], 1)
        image = self.dec(s_r + self.dec.direction(decoded), [f[:b] for f in feats]).image
        return (image, magnitudes) if with_magnitudes else image


# What a motion latent depends on: the encoder (appearance code, magnitudes) and the decoder's direction basis.
MOTION_PARTS = ("enc.", "dec.direction.")


def finest_level(autoencoder: MotionAutoencoder) -> tuple[str, ...]:
    """Name prefixes (in `Reconstruction`) of the decoder's finest level: its two convs, flow and RGB heads.
    A decoder trained from scratch draws its frame at the level below for thousands of steps (a blurred frame);
    its own learning-rate multiplier (`LoopSettings.lr_scale`) brings the finest level in sooner."""
    level = len(autoencoder.dec.to_rgbs) - 1
    return (f"dec.convs.{2 * level}.", f"dec.convs.{2 * level + 1}.", f"dec.to_flows.{level}.",
            f"dec.to_rgbs.{level}.")


def start_with_still_warps(autoencoder: MotionAutoencoder, scale: float = 0.01) -> None:
    """For training from random weights: every level's flow head starts (almost) silent, so the decoder's
    first warps are the identity and its first frames are the source itself.

    With the random heads, each level adds its own random flow to the coarser levels' (the skip), and the
    finest grids move samples by up to half the frame: the network first spends thousands of steps
    learning to stop scrambling the source before it can learn motion. Shrinking the heads' weights (not
    zeroing them: their modulation still gets gradients) and zeroing their biases skips that phase."""
    with torch.no_grad():
        for head in autoencoder.dec.to_flows:
            assert isinstance(head, ToFlow)
            head.conv.weight.mul_(scale)
            head.bias.zero_()


def scale_motion_latents(autoencoder: MotionAutoencoder, factor: float) -> None:
    """Reparametrise a trained auto-encoder so that every code it makes (s_r, and the motion latents r_s and
    r_d) is `factor` times larger while every decoded frame stays the same.

    Flow matching adds unit-variance noise to the motion latents. An auto-encoder trained from scratch here
    makes latents of about 0.04 per dimension (0.02 for the moving part), so by the sampler's last step (noise
    0.125) nothing of the motion is left to resolve and the transformer's motion comes out damped; a latent
    diffusion model scales its latents to unit variance for the same reason. Exact, because the codes only
    meet linear maps: the appearance code's last convolution (no bias) is scaled up, the motion MLP (linear
    layers only) takes its input scaled down and its output scaled up, and every decoder modulation that reads
    s_r + r_d takes it scaled down."""
    if factor <= 0:
        raise ValueError(f"the latent scale must be positive, not {factor}")
    enc, dec = autoencoder.enc, autoencoder.dec
    fc = [layer for layer in enc.fc if isinstance(layer, EqualLinear)]
    if len(fc) != len(enc.fc):
        raise ValueError("the motion MLP is not made of linear layers only: its codes cannot be rescaled exactly")
    with torch.no_grad():
        code_conv = enc.net_app.convs[-1]
        if code_conv.bias is not None:
            raise ValueError("the appearance code's convolution has a bias: its codes cannot be rescaled exactly")
        code_conv.weight.mul_(factor)
        fc[0].weight.div_(factor)
        fc[-1].weight.mul_(factor)
        fc[-1].bias.mul_(factor)
        for module in dec.modules():
            if isinstance(module, ModulatedConv2d):
                module.modulation.weight.div_(factor)
        if autoencoder.canonical is not None:  # codes like the others
            autoencoder.canonical.appearance.mul_(factor)
            autoencoder.canonical.motion.mul_(factor)


# -- data -----------------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    source: torch.Tensor  # uint8 [B, 3, S, S] on the CPU, float in [-1, 1] after `to`
    driving: torch.Tensor
    keys: torch.Tensor
    # The driving frames' known motion when a rig rendered them ([B, K], rig_pairs.CODE_FIELDS), else None.
    driving_code: torch.Tensor | None = None
    # Where the mouth is on either frame when a rig rendered them ([B, 1, S, S] in {0, 1}), else None.
    mouth: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> PairBatch:
        scale = lambda x: x.to(device, dtype) / 127.5 - 1 if x.dtype == torch.uint8 else x.to(device, dtype)
        code = None if self.driving_code is None else self.driving_code.to(device, dtype)
        mouth = None if self.mouth is None else self.mouth.to(device, dtype)
        return PairBatch(scale(self.source), scale(self.driving), self.keys, code, mouth)

    @property
    def size(self) -> int:
        return self.source.shape[0]


class FramePairs:
    """Random (source, driving) pairs of frames of the same clip. Clips are uint8 crops [N, S, S, 3].

    Pair j of step s is drawn from a generator keyed by (seed, s, j), so any split of a global batch over
    processes or micro-batches sees the same pairs (the contract of `WindowSet.batch`)."""

    def __init__(self, clips: Sequence[torch.Tensor], seed: int = 0, min_gap: int = 1):
        if not clips:
            raise ValueError("no clips to train the auto-encoder on")
        for n, clip in enumerate(clips):
            if clip.dim() != 4 or clip.shape[-1] != 3 or clip.dtype != torch.uint8:
                raise ValueError(f"clip {n}: expected uint8 face crops [frames, S, S, 3], got {clip.dtype} "
                                 f"{list(clip.shape)}")
            if clip.shape[0] < 2:
                raise ValueError(f"clip {n} has {clip.shape[0]} frame(s): a pair needs two")
        if len({tuple(c.shape[1:]) for c in clips}) != 1:
            raise ValueError("all clips must have crops of one size")
        self.clips = [c.permute(0, 3, 1, 2).contiguous() for c in clips]
        self.seed = seed
        self.min_gap = min_gap
        frames = torch.tensor([c.shape[0] for c in self.clips], dtype=torch.float64)
        self.weights = frames / frames.sum()  # a clip is picked in proportion to its length

    def __len__(self) -> int:
        return sum(c.shape[0] for c in self.clips)

    def pair(self, step: int, key: int) -> tuple[int, int, int]:
        gen = window_generator(self.seed, step, key)
        clip = int(torch.multinomial(self.weights, 1, generator=gen))
        n = self.clips[clip].shape[0]
        gap = min(self.min_gap, n - 1)
        source = int(torch.randint(0, n, (1,), generator=gen))
        others = [i for i in range(n) if abs(i - source) >= gap]
        driving = others[int(torch.randint(0, len(others), (1,), generator=gen))]
        return clip, source, driving

    def batch(self, step: int, global_batch: int, first: int, count: int) -> PairBatch:
        if first < 0 or first + count > global_batch:
            raise ValueError(f"slice [{first}, {first + count}) outside a global batch of {global_batch}")
        picks = [self.pair(step, j) for j in range(first, first + count)]
        source = torch.stack([self.clips[c][s] for c, s, _ in picks])
        driving = torch.stack([self.clips[c][d] for c, _, d in picks])
        return PairBatch(source, driving, torch.arange(first, first + count, dtype=torch.int64))


# -- losses ---------------------------------------------------------------------------------------------------


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(like.device, like.dtype).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """[B] mean SSIM of images in [0, 1] (Wang et al. 2004 constants), Gaussian window, valid region only."""
    c = a.shape[1]
    w = _gaussian_window(min(window, a.shape[-1]), sigma, c, a)
    blur = lambda x: F.conv2d(x, w, groups=c)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def gradient_loss(a: torch.Tensor, b: torch.Tensor, scales: int = 3) -> torch.Tensor:
    """[B] L1 between the horizontal and vertical finite differences of a and b, averaged over `scales`
    resolutions (each half the previous, by 2x2 average pooling)."""
    total = a.new_zeros(a.shape[0])
    for level in range(scales):
        if level:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        dx = lambda x: x[..., :, 1:] - x[..., :, :-1]
        dy = lambda x: x[..., 1:, :] - x[..., :-1, :]
        total = total + (dx(a) - dx(b)).abs().flatten(1).mean(1) + (dy(a) - dy(b)).abs().flatten(1).mean(1)
    return total / scales


def load_perceptual(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A frozen perceptual network from a local TorchScript file (`torch.jit.save` of a module mapping images
    [B, 3, H, W] in [-1, 1] to a tensor or a list / tuple of feature tensors). Nothing is downloaded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perceptual network {path}: no such file (give a TorchScript .pt saved with "
                                "torch.jit.save; nothing is downloaded)")
    net = torch.jit.load(str(path), map_location=device)
    return net.eval().requires_grad_(False)


def perceptual_loss(net: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    fa, fb = net(a), net(b)
    if isinstance(fa, torch.Tensor):
        fa, fb = [fa], [fb]
    return torch.stack([(x - y).abs().flatten(1).mean(1) for x, y in zip(fa, fb, strict=True)]).mean(0)


def moving_l1(recon: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """[B] L1 of recon vs target weighted by where the target differs from the source (their absolute
    difference, blurred over 5x5 so the weight covers the moved part's surroundings), normalised per pair.

    A mouth that opens is a few hundred pixels of a 128 px frame: in the plain L1 its error is small next to
    the blur everywhere else, and a from-scratch auto-encoder learns to copy the source long before it learns
    to move anything. This term is the same error seen only where something moved."""
    weight = F.avg_pool2d((target - source).abs().mean(1, keepdim=True), 5, stride=1, padding=2)
    error = (recon - target).abs().mean(1, keepdim=True)
    return (weight * error).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-6)


def region_l1(recon: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """[B] mean L1 of recon vs target inside `region` [B, 1, S, S] (0 where a pair's region is empty).

    A smile moves the mouth corners by a few pixels at 128 px: next to a head turn's whole-face motion that
    is little even in the `moving` term, and a decoder trained on both renders about half of the smile
    (docs/training.md §6). This term is the error on the mouth alone."""
    error = (recon - target).abs().mean(1, keepdim=True)
    return (region * error).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1.0)


@dataclass(frozen=True)
class ReconstructionWeights:
    l1: float = 1.0
    ssim: float = 0.5
    gradient: float = 0.5
    perceptual: float = 1.0  # used only with a perceptual network
    moving: float = 0.0  # L1 where source and driving differ (see `moving_l1`)
    mouth: float = 0.0  # rig-rendered pairs: L1 inside the mouth region (see `region_l1`)
    code: float = 0.0  # rig-rendered pairs: the first motion magnitudes regress the known expression
    teacher: float = 0.0  # rig-rendered pairs: share of pairs whose decoder gets the known expression
    # Rig-rendered pairs: a weight per code field (rig_pairs.CODE_FIELDS order) inside the code term; empty =
    # all 1. Small expressions (a smile moves a few pixels at 128 px) need more than the head turns do.
    code_fields: tuple[float, ...] = ()


class ReconstructionObjective:
    """The LIA reconstruction loss of a `PairBatch` (see the module docstring)."""

    def __init__(self, weights: ReconstructionWeights = ReconstructionWeights(), perceptual: nn.Module | None = None):
        self.w = weights
        self.perceptual = perceptual

    def parts(self, recon: torch.Tensor, target: torch.Tensor, source: torch.Tensor | None = None,
              mouth: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """[B] per-pair terms of images in [-1, 1] (`source` is needed for the `moving` term, `mouth` for
        the `mouth` term)."""
        recon, target = recon.float(), target.float()
        out = {"l1": (recon - target).abs().flatten(1).mean(1),
               "ssim": 1 - ssim((recon.clamp(-1, 1) + 1) / 2, (target + 1) / 2),
               "gradient": gradient_loss(recon, target)}
        if self.perceptual is not None:
            out["perceptual"] = perceptual_loss(self.perceptual, recon, target)
        if self.w.moving and source is not None:
            out["moving"] = moving_l1(recon, target, source.float())
        if self.w.mouth and mouth is not None:
            out["mouth"] = region_l1(recon, target, mouth.float())
        return out

    def loss(self, net: nn.Module, batch: PairBatch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.w.code and batch.driving_code is not None:
            # Teacher forcing for a share of the pairs (the same pairs at any batch split: keyed by pair).
            forced = ((batch.keys * 2_654_435_761 + step) % 1000 < int(self.w.teacher * 1000)).to(batch.source.device)
            recon, magnitudes = net(batch.source, batch.driving, with_magnitudes=True, known=batch.driving_code,
                                    forced=forced)
            parts = self.parts(recon, batch.driving, batch.source, batch.mouth)
            known = batch.driving_code.float()
            per_field = known.new_tensor(self.w.code_fields or (1.0,) * known.shape[1])
            if per_field.shape[0] != known.shape[1]:
                raise ValueError(f"{per_field.shape[0]} code field weights for {known.shape[1]} code fields")
            parts["code"] = (per_field * (magnitudes[:, :known.shape[1]].float() - known) ** 2).sum(1) / per_field.sum()
        else:
            parts = self.parts(net(batch.source, batch.driving), batch.driving, batch.source, batch.mouth)
        total = sum(getattr(self.w, name) * value.mean() for name, value in parts.items())
        assert isinstance(total, torch.Tensor)
        metrics = {name: float(value.mean().detach()) for name, value in parts.items()}
        return total, {"loss": float(total.detach()), **metrics}


@torch.no_grad()
def reconstruction_error(autoencoder: MotionAutoencoder, pairs: FramePairs, count: int = 16, seed: int = 12345,
                         batch: int = 8) -> float:
    """Mean L1 (images in [-1, 1]) of `count` fixed pairs: a held-out figure independent of the loss weights."""
    net = Reconstruction(autoencoder).eval()
    param = next(autoencoder.parameters())
    held = FramePairs([c.permute(0, 2, 3, 1) for c in pairs.clips], seed=seed, min_gap=pairs.min_gap)
    errors = []
    for first in range(0, count, batch):
        n = min(batch, count - first)
        b = held.batch(0, count, first, n).to(param.device, param.dtype)
        errors.append((net(b.source, b.driving).float() - b.driving.float()).abs().flatten(1).mean(1))
    return float(torch.cat(errors).mean())


# -- checkpoints ----------------------------------------------------------------------------------------------


def autoencoder_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The trained auto-encoder (e.g. the EMA copy of `Reconstruction`) under the official names."""
    return {PREFIX + k: v.detach().clone() for k, v in net.state_dict().items()}


def export_autoencoder(model: AvatarForcing):
    """An export hook writing both the auto-encoder alone (the layout of the official motion_autoencoder
    file) and the whole model with the trained auto-encoder (loads with `--weights FILE`)."""
    def export(ema: nn.Module, out: Path) -> None:
        trained = autoencoder_state_dict(ema)
        whole = {k: v.detach().clone() for k, v in model.state_dict().items()}
        whole.update(trained)
        meta = {"format": "pt", "producer": "avatar-forcing train autoencoder"}
        for name, tensors in ((AUTOENCODER_NAME, trained), (MODEL_NAME, whole)):
            write_safetensors({k: v.contiguous().cpu() for k, v in tensors.items()}, out / name, metadata=meta)

    return export


def crops_of_video(path: str | Path, size: int, max_frames: int | None = None, detect_stride: int = 5,
                   detector=None) -> torch.Tensor:
    """uint8 face crops [N, size, size, 3] of a video at 25 fps: the reference's one fixed crop per clip, at most
    `max_frames` frames taken evenly over the clip."""
    import numpy as np

    from ..media.face import crop_video_fixed
    from ..media.video import read_video_frames

    frames = read_video_frames(path)
    if max_frames is not None and len(frames) > max_frames:
        frames = frames[np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    crops = crop_video_fixed(frames, size=size, detector=detector, detect_stride=detect_stride)
    return torch.from_numpy(np.ascontiguousarray(crops))


def autoencoder_trainer(model: AvatarForcing, clips: Sequence[torch.Tensor], loop, out_dir: str | Path,
                        weights: ReconstructionWeights = ReconstructionWeights(), perceptual: nn.Module | None = None,
                        device: torch.device | str = "cpu", dist_info=None, min_gap: int = 1, pairs=None,
                        freeze_motion: bool = False):
    """A ready `Trainer` of the motion auto-encoder on face-crop clips (uint8 [N, S, S, 3], S = input size), or
    on `pairs` given ready (e.g. `rig_pairs.RigPairs`; then `clips` is unused). `freeze_motion` trains the
    decoder's synthesis only: the encoder and the motion directions stay, and with them every motion latent
    already computed (prepared shards, a transformer trained on them)."""
    from .loop import Trainer

    size = model.config.motion.input_size
    for n, clip in enumerate(clips):
        if tuple(clip.shape[1:3]) != (size, size):
            raise ValueError(f"clip {n}: crops are {list(clip.shape[1:3])}, the auto-encoder takes {size}x{size}")
    if not math.log2(size).is_integer():
        raise ValueError(f"input size {size} is not a power of two")
    if pairs is None:
        pairs = FramePairs(clips, seed=loop.seed, min_gap=min_gap)
    model.to(device)
    net = Reconstruction(model.motion_autoencoder).requires_grad_(True)
    if freeze_motion:
        for name, param in net.named_parameters():
            param.requires_grad_(not name.startswith(MOTION_PARTS))
    objective = ReconstructionObjective(weights, perceptual)
    return Trainer(net, objective, pairs, loop, out_dir, export_autoencoder(model), torch.device(device), dist_info)
