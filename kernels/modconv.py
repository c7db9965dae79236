"""Style-modulated convolution (StyleGAN2), for a batch where every sample has its own style.

Reference: the upstream formulation: build each sample's modulated (and demodulated) weight and run one
grouped convolution with a group per sample. Fast: scale the input channels by the style, run one ordinary
convolution shared by the batch, and scale the output channels by the demodulation factor: the same
mathematics, but a dense convolution the GPU runs at full speed instead of B tiny groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .choice import Kernel, any_device


def modconv_reference(x: torch.Tensor, weight: torch.Tensor, style: torch.Tensor, demodulate: bool,
                      upsample: bool, padding: int) -> torch.Tensor:
    """x [B, in, H, W]; weight [out, in, k, k] (already scaled); style [B, in] -> [B, out, H', W']
    (with upsample: a stride-2 transposed convolution, before the blur that the caller applies)."""
    b, cin, h, w = x.shape
    cout, _, k, _ = weight.shape
    wmod = weight[None] * style[:, None, :, None, None]  # [B, out, in, k, k]
    if demodulate:
        wmod = wmod * torch.rsqrt(wmod.square().sum((2, 3, 4)) + 1e-8)[:, :, None, None, None]
    x = x.reshape(1, b * cin, h, w)
    if upsample:
        wmod = wmod.transpose(1, 2).reshape(b * cin, cout, k, k)
        out = F.conv_transpose2d(x, wmod, stride=2, groups=b)
    else:
        out = F.conv2d(x, wmod.reshape(b * cout, cin, k, k), padding=padding, groups=b)
    return out.reshape(b, cout, *out.shape[2:])


def modconv_fused(x: torch.Tensor, weight: torch.Tensor, style: torch.Tensor, demodulate: bool,
                  upsample: bool, padding: int) -> torch.Tensor:
    x = x * style[:, :, None, None]
    if upsample:
        out = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
    else:
        out = F.conv2d(x, weight, padding=padding)
    if demodulate:
        # rsqrt(sum_{in,k,k} (w * s_in)^2 + eps) per sample and output channel
        energy = style.square() @ weight.square().sum((2, 3)).t()  # [B, out]
        out = out * torch.rsqrt(energy + 1e-8)[:, :, None, None]
    return out


MODCONV = Kernel("modulated_conv", modconv_reference, modconv_fused, any_device)
