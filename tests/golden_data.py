"""Locating and reading the reference golden folders (see ../shared/golden/*/README.md).

`AVATAR_FORCING_GOLDEN` lists folders separated by os.pathsep; each folder configures the model from its
own `small_config.json` and weights. A folder's optional `strong/` subfolder is a second variant with its
own weights and the cases that depend on them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GOLDEN = REPO_ROOT.parent / "shared" / "golden" / "avatar_forcing_ref_v1"
MEDIA_DIR = REPO_ROOT.parent / "shared" / "media"

MAIN_TOLERANCE = 1e-4
STRONG_TOLERANCE = 2e-5  # strong/'s transformer and sample cases


def golden_folders() -> list[Path]:
    raw = os.environ.get("AVATAR_FORCING_GOLDEN")
    if not raw:
        return [DEFAULT_GOLDEN]
    return [Path(p) for p in raw.split(os.pathsep) if p]


@dataclass(frozen=True)
class GoldenSet:
    folder: Path
    variant: str  # "main" or "strong"

    @property
    def case_dir(self) -> Path:
        return self.folder / "strong" if self.variant == "strong" else self.folder

    @property
    def weights_path(self) -> Path:
        return self.case_dir / "small_weights.safetensors"

    def has_case(self, name: str) -> bool:
        return (self.folder / f"case_{name}.safetensors").exists()

    def case(self, name: str) -> dict[str, torch.Tensor]:
        """The variant's own case file where it has one, else the main one (identical by construction)."""
        own = self.case_dir / f"case_{name}.safetensors"
        return _load(own if own.exists() else self.folder / f"case_{name}.safetensors")

    def inputs(self, name: str) -> dict[str, torch.Tensor]:
        """The main case file: strong/ omits the raw inputs it shares with it."""
        return _load(self.folder / f"case_{name}.safetensors")

    def tolerance(self, case: str) -> float:
        if self.variant == "strong" and case in ("transformer", "sample"):
            return STRONG_TOLERANCE
        return MAIN_TOLERANCE


@functools.cache
def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def golden_sets() -> list:
    """pytest params: one per (folder, variant); a skip param with the reason when none exists."""
    params = []
    for folder in golden_folders():
        if not (folder / "small_config.json").exists():
            continue
        params.append(pytest.param(GoldenSet(folder, "main"), id=f"{folder.name}-main"))
        if (folder / "strong" / "small_weights.safetensors").exists():
            params.append(pytest.param(GoldenSet(folder, "strong"), id=f"{folder.name}-strong"))
    if not params:
        reason = (f"no golden folder found (looked in {', '.join(map(str, golden_folders()))}); "
                  "set AVATAR_FORCING_GOLDEN to the reference folders")
        params.append(pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-golden"))
    return params


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    diff = actual.detach().double().reshape(expected.shape) - expected
    return float(diff.norm() / expected.norm().clamp_min(1e-30))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_l2(actual, expected)
    assert err < tol, f"{what}: relative L2 error {err:.3e} >= {tol:.0e}"


@functools.cache
def golden_model(gs: GoldenSet):
    """The model of a golden set, configured from its folder, its weights loaded strictly (shared)."""
    from avatar_forcing.model.avatar_forcing import build_model
    from avatar_forcing.model.config import from_golden_dir

    model = build_model(from_golden_dir(gs.folder))
    model.load_state_dict(load_file(str(gs.weights_path)), strict=True)
    return model


def small_model(folder: Path, rope_positions: int | None = None, strong: bool = True):
    """A fresh small-configuration model from a golden folder (strong/ weights where there are some, as
    their paths carry more signal), optionally with a different RoPE table length."""
    import dataclasses

    from avatar_forcing.model.avatar_forcing import build_model
    from avatar_forcing.model.config import from_golden_dir

    cfg = from_golden_dir(folder)
    if rope_positions:
        cfg = dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer,
                                                                       rope_max_positions=rope_positions))
    model = build_model(cfg)
    weights = folder / "strong" / "small_weights.safetensors"
    if not (strong and weights.exists()):
        weights = folder / "small_weights.safetensors"
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model

