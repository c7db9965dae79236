"""Locating and reading the reference golden folders (see ../shared/golden/*/README.md).

`AVATAR_FORCING_GOLDEN` lists folders separated by os.pathsep; each folder configures the model from its
own `small_config.json` and weights. A folder's optional `strong/` subfolder is a second variant with its
own weights and the cases that depend on them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
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


def model_folders() -> list:
    """pytest params: every golden folder that configures a small model (a skip param when none does)."""
    folders = [f for f in golden_folders() if (f / "small_config.json").exists()]
    if not folders:
        return [pytest.param(None, marks=pytest.mark.skip(reason="needs a golden folder for the small "
                                                          "configuration (AVATAR_FORCING_GOLDEN)"), id="no-golden")]
    return [pytest.param(f, id=f.name) for f in folders]


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    diff = actual.detach().double().reshape(expected.shape) - expected
    return float(diff.norm() / expected.norm().clamp_min(1e-30))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    shapes = tuple(actual.shape), tuple(expected.shape)
    assert shapes[0] == shapes[1], f"{what}: shape {shapes[0]} != {shapes[1]}"
    err = relative_l2(actual, expected)
    assert err < tol, f"{what}: relative L2 error {err:.3e} >= {tol:.0e}"


def case_meta(gs: GoldenSet, name: str) -> dict:
    """The scalar settings a case recorded (its `meta` JSON)."""
    own = gs.case_dir / f"case_{name}.safetensors"
    path = own if own.exists() else gs.folder / f"case_{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


def recorded_sampler(gs: GoldenSet):
    """The sampler settings the reference used for case_sample, from the case's own record."""
    from avatar_forcing.model.config import SamplerConfig, from_golden_dir

    meta = case_meta(gs, "sample")
    base = from_golden_dir(gs.folder).sampler
    return SamplerConfig(nfe=int(meta["nfe"]), num_train_timesteps=base.num_train_timesteps,
                         a_cfg_scale=float(meta["a_cfg_scale"]), u_cfg_scale=float(meta["u_cfg_scale"]))


@functools.cache
def golden_model(gs: GoldenSet):
    """The model of a golden set, configured from its folder (sampler: what case_sample recorded), its
    weights loaded strictly (shared)."""
    from avatar_forcing.model.avatar_forcing import build_model
    from avatar_forcing.model.config import from_golden_dir

    cfg = from_golden_dir(gs.folder)
    if gs.has_case("sample"):
        cfg = dataclasses.replace(cfg, sampler=recorded_sampler(gs))
    model = build_model(cfg)
    model.load_state_dict(load_file(str(gs.weights_path)), strict=True)
    return model


def engine_rollout(model, r_s: torch.Tensor, cond, num_frames: int, *, seed: int | None = None, noise=None,
                   trace: bool = False, upstream_steps: bool = False):
    """Offline generation of num_frames motion latents through the production path (the streaming engine
    and its block runner, one session, precomputed conditions). Returns latents [1, T, dim_w] and, when
    asked, the runner's per-block trace."""
    from avatar_forcing.model.engine import EngineSettings, PrecomputedInputs, StreamingEngine
    from avatar_forcing.model.motion_autoencoder import PortraitCode

    engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False, upstream_steps=upstream_steps))
    engine.trace = [] if trace else None
    wa, wa_user, motion = (x[0, :num_frames] for x in (cond.wa, cond.wa_user, cond.motion_user))
    session = engine.open_session(PortraitCode(torch.zeros_like(r_s), [], r_s),
                                  inputs=PrecomputedInputs(wa, wa_user, motion), seed=seed, noise=noise)
    blocks = []
    while not session.finished:
        blocks.extend(out.latents for out in engine.step(now=0.0))
    engine.close_session(session.id)
    return torch.cat(blocks)[None], engine.trace


def small_model(folder: Path, rope_positions: int | None = None, strong: bool = True):
    """A fresh small-configuration model from a golden folder (strong/ weights where there are some, as
    their paths carry more signal), optionally with a different RoPE table length."""
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

