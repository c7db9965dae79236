"""Each fast path against its plain reference, on random inputs of the full model's shapes.

On the CPU both run (fp32: they must agree to rounding); on a GPU the fast path also runs in bf16 against
the fp32 reference (within the bf16 bound below). Never on zeros: every input is random.
"""

from __future__ import annotations

import pytest
import torch
from golden_data import relative_l2

from avatar_forcing.kernels.attention import ATTENTION
from avatar_forcing.kernels.choice import Kernel
from avatar_forcing.kernels.modconv import MODCONV
from avatar_forcing.kernels.warp import WARP
from avatar_forcing.model.flow_transformer import lookahead_mask

FP32_BOUND = 1e-5
BF16_BOUND = 2e-2  # bf16 keeps 8 bits of mantissa: ~4e-3 per rounding, a few roundings deep
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here: the GPU comparison runs where there is one")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def warp_inputs(device="cpu"):
    g = gen(0)
    feat = torch.randn(3, 256, 64, 64, generator=g)  # 3 sessions, the 64x64 level of the full decoder
    grid = (torch.rand(3 * 10, 64, 64, 2, generator=g) * 2.2 - 1.1)  # 10 frames each, some outside [-1, 1]
    return feat.to(device), grid.to(device)


def modconv_inputs(upsample: bool, demodulate: bool, k: int = 3, device="cpu"):
    g = gen(1)
    x = torch.randn(4, 512, 16, 16, generator=g)
    weight = torch.randn(3 if not demodulate else 512, 512, k, k, generator=g) / (512 * k * k) ** 0.5
    style = 1 + 0.3 * torch.randn(4, 512, generator=g)
    return (x.to(device), weight.to(device), style.to(device), demodulate, upsample, k // 2)


def attention_inputs(streaming: bool, device="cpu"):
    g = gen(2)
    n, m = (12, 50) if streaming else (50, 50)
    q = torch.randn(6, 8, n, 128, generator=g)
    k, v = torch.randn(6, 8, m, 128, generator=g), torch.randn(6, 8, m, 128, generator=g)
    mask = lookahead_mask(n, m, 2)
    return q.to(device), k.to(device), v.to(device), mask.to(device)


CASES = {
    "warp": (WARP, lambda device="cpu": warp_inputs(device)),
    "modconv 3x3": (MODCONV, lambda device="cpu": modconv_inputs(False, True, device=device)),
    "modconv 3x3 upsample": (MODCONV, lambda device="cpu": modconv_inputs(True, True, device=device)),
    "modconv 1x1 to flow": (MODCONV, lambda device="cpu": modconv_inputs(False, False, k=1, device=device)),
    "attention streaming": (ATTENTION, lambda device="cpu": attention_inputs(True, device)),
    "attention priming": (ATTENTION, lambda device="cpu": attention_inputs(False, device)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_matches_reference_fp32(case):
    kernel, inputs = CASES[case]
    args = inputs()
    reference, fast = kernel.reference(*args), kernel.fast(*args)
    assert reference.shape == fast.shape
    assert reference.abs().max() > 0, "degenerate inputs"
    assert relative_l2(fast, reference) < FP32_BOUND


@needs_cuda
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_fast_path_bf16_matches_fp32_reference(case):
    kernel, inputs = CASES[case]
    args = inputs("cuda")
    reference = kernel.reference(*args).float()
    low = [a.bfloat16() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    assert relative_l2(kernel.choose("cuda")(*low).float(), reference) < BF16_BOUND


def test_choose_follows_device_support_and_the_override(monkeypatch):
    kernel = Kernel("demo", reference=lambda: "reference", fast=lambda: "fast",
                    supports=lambda device: device.type == "cuda")
    assert kernel.choose("cpu")() == "reference"
    assert kernel.choose("cuda")() == "fast"
    monkeypatch.setenv("AVATAR_FORCING_KERNELS", "reference")
    assert kernel.choose("cuda")() == "reference"
    assert WARP.choose("cpu") is WARP.reference
