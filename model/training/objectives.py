"""What the transformer trainings optimise: the flow-matching loss and label-free Diffusion-DPO.

`Velocity` is the trainable part of the model as one module (the audio projection and the flow
transformer, the two halves of the released `flow_transformer.pth`), so DDP, EMA and the optimiser see
exactly those parameters. Its submodules are the model's own: training updates the model in place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..avatar_forcing import AvatarForcing
from .data import WindowBatch
from .flow_matching import (
    AUDIO_ONLY,
    FULL,
    UNCOND,
    USER_ONLY,
    DropoutSettings,
    FlowMatchTable,
    NoiseSettings,
    draw,
    per_window_l1,
)

# Official names of the trained parameters: Velocity's prefix -> the full model's prefix.
OFFICIAL_PREFIX = {"audio_projection.": "audio_encoder.audio_projection.", "flow_transformer.": "flow_transformer."}


class Velocity(nn.Module):
    def __init__(self, model: AvatarForcing):
        super().__init__()
        self.audio_projection = model.audio_encoder.audio_projection
        self.flow_transformer = model.flow_transformer

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, batch: WindowBatch, branch: torch.Tensor,
                drop_reference: torch.Tensor) -> torch.Tensor:
        """Velocity [B, L, D] of noisy windows, under each window's condition dropout (zeros of the projected
        features, as the sampler's null branches)."""
        keep = lambda mask, x: x * (~mask).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        branch = branch.to(x_t.device)
        no_avatar = (branch == USER_ONLY) | (branch == UNCOND)
        no_user = (branch == AUDIO_ONLY) | (branch == UNCOND)
        wa = keep(no_avatar, self.audio_projection(batch.audio))
        wa_user = keep(no_user, self.audio_projection(batch.user_audio))
        motion_user = keep(no_user, batch.user_motion)
        r_s = keep(drop_reference.to(x_t.device), batch.r_s)
        ft = self.flow_transformer
        cond = ft.condition(wa_user, motion_user, wa)
        positions = torch.arange(x_t.shape[1], device=x_t.device).expand(x_t.shape[0], -1)
        # A full window with no cache: exactly the priming masks (causal + look-ahead, windowed cross).
        v, _ = ft(x_t, t, cond, r_s, positions)
        return v


def official_state_dict(model: AvatarForcing, velocity: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict under official names, with `velocity`'s values (e.g. the EMA copy) for
    the trained parameters: loads wherever the released checkpoints load."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, value in velocity.state_dict().items():
        prefix = next(p for p in OFFICIAL_PREFIX if name.startswith(p))
        out[OFFICIAL_PREFIX[prefix] + name[len(prefix):]] = value.detach().clone()
    return out


@dataclass(frozen=True)
class FlowSettings:
    noise: NoiseSettings = NoiseSettings()
    dropout: DropoutSettings = DropoutSettings()


class FlowMatchingObjective:
    """L1 between the predicted and the true velocity, per-frame noise levels (diffusion forcing)."""

    def __init__(self, table: FlowMatchTable, settings: FlowSettings, seed: int):
        self.table = table
        self.settings = settings
        self.seed = seed

    def draw(self, batch: WindowBatch, step: int):
        return draw(self.seed, step, batch.keys, batch.motion.shape[1], batch.motion.shape[2], len(self.table),
                    self.settings.noise, self.settings.dropout)

    def window_losses(self, net: nn.Module, batch: WindowBatch, x0: torch.Tensor, d) -> torch.Tensor:
        """[B] flow-matching L1 of clean latents x0 under draw d."""
        noise = d.noise.to(x0.device, x0.dtype)
        x_t, t, target = self.table.noised(x0, noise, d.index)
        v = net(x_t, t, batch, d.branch, d.drop_reference)
        return per_window_l1(v, target, self.table.frame_weights(d.index, self.settings.noise.loss_weighting))

    def loss(self, net: nn.Module, batch: WindowBatch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        losses = self.window_losses(net, batch, batch.motion, self.draw(batch, step))
        loss = losses.mean()
        return loss, {"loss": float(loss.detach())}


DPO_VELOCITIES = ("branch", "full", "guided")


@dataclass(frozen=True)
class DPOSettings:
    # beta and the velocity are the setting that reproduced the paper's Table-4 direction on the synthetic
    # set, across training seeds (docs/training.md §5); the paper's own values are not in our copy.
    beta: float = 5.0
    sft_weight: float = 1.0  # lambda: the flow-matching loss on winners, keeps the model near the data
    # Which velocity the preference term compares (the flow-matching term always trains the dropped-out
    # branches): "branch" = the window's own condition-dropout branch (as flow matching); "full" = the
    # full-condition branch; "guided" = the sampler's guided combination of the three branches, i.e.
    # exactly the velocity inference integrates.
    velocity: str = "full"
    guidance: tuple[float, float] = (2.0, 1.0)  # (avatar-audio, user) scales for "guided": the sampler's

    def __post_init__(self) -> None:
        if self.velocity not in DPO_VELOCITIES:
            raise ValueError(f"DPO velocity must be one of {', '.join(DPO_VELOCITIES)}, got {self.velocity!r}")
        if self.beta <= 0 or self.sft_weight < 0:
            raise ValueError(f"need beta > 0 and sft_weight >= 0, got {self.beta}, {self.sft_weight}")


def _repeat(x: torch.Tensor, times: int) -> torch.Tensor:
    return torch.cat([x] * times)


def _batch_times(batch: WindowBatch, x0: torch.Tensor, times: int) -> WindowBatch:
    """`batch`'s conditions repeated `times` times along the batch, with clean latents x0 ([times * B, L, D])."""
    return WindowBatch(x0, _repeat(batch.r_s, times), _repeat(batch.audio, times), _repeat(batch.user_audio, times),
                       _repeat(batch.user_motion, times), None, _repeat(batch.keys, times))


class DPOObjective:
    """Diffusion-DPO with per-frame noise (label-free): winner = ground-truth latents, loser = the cached
    latents a model generated for the same window without the user's conditions. Winner and loser share
    noise, noise levels and condition dropout; a frozen copy of the starting model is the reference.

    loss = -log sigmoid(-beta * [(e_w(theta) - e_w(ref)) - (e_l(theta) - e_l(ref))]) + lambda * e_w(theta)
    with e the per-window weighted L1 of a velocity against the target (which velocity: `DPOSettings.velocity`);
    the lambda term is the plain flow-matching loss on the winners (their dropout branch).
    """

    def __init__(self, table: FlowMatchTable, flow: FlowSettings, settings: DPOSettings, seed: int,
                 reference: nn.Module):
        self.fm = FlowMatchingObjective(table, flow, seed)
        self.settings = settings
        self.reference = copy.deepcopy(reference).requires_grad_(False).eval()

    def _pair_errors(self, net: nn.Module, batch: WindowBatch, d, with_fm: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """([2B] preference errors of winners then losers, [B] flow-matching errors of the winners' branch;
        the latter only when `with_fm` and lambda > 0, else the winners' preference errors)."""
        table, b = self.fm.table, batch.size
        pair = torch.cat([batch.motion, batch.loser])  # type: ignore[list-item]  # checked by the caller
        noise = _repeat(d.noise, 2).to(pair.device, pair.dtype)
        index = _repeat(d.index, 2)
        x_t, t, target = table.noised(pair, noise, index)
        weights = table.frame_weights(index, self.fm.settings.noise.loss_weighting)
        drop_ref = _repeat(d.drop_reference, 2)
        mode = self.settings.velocity
        if mode == "guided":  # the three sampler branches of both sides in one call
            branches = torch.cat([torch.full((2 * b,), k) for k in (AUDIO_ONLY, USER_ONLY, UNCOND)])
            v = net(_repeat(x_t, 3), _repeat(t, 3), _batch_times(batch, _repeat(pair, 3), 6), branches,
                    _repeat(drop_ref, 3))
            v_audio, v_user, v_uncond = v.chunk(3)
            a, u = self.settings.guidance
            v = v_uncond + a * (v_audio - v_uncond) + u * (v_user - v_uncond)
            e = per_window_l1(v, target, weights)
            fm = with_fm and self.settings.sft_weight > 0
            return e, self.fm.window_losses(net, batch, batch.motion, d) if fm else e[:b]
        branch = _repeat(d.branch, 2) if mode == "branch" else torch.full((2 * b,), FULL)
        v = net(x_t, t, _batch_times(batch, pair, 2), branch, drop_ref)
        e = per_window_l1(v, target, weights)
        if mode == "branch" or not (with_fm and self.settings.sft_weight > 0):
            return e, e[:b]
        return e, self.fm.window_losses(net, batch, batch.motion, d)

    def loss(self, net: nn.Module, batch: WindowBatch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.loser is None:
            raise ValueError("DPO needs losers: generate them first (`avatar-forcing train dpo` caches them)")
        d = self.fm.draw(batch, step)
        e_theta, sft_errors = self._pair_errors(net, batch, d)
        with torch.no_grad():
            e_ref, _ = self._pair_errors(self.reference, batch, d, with_fm=False)
        b = batch.size
        gap = (e_theta[:b] - e_ref[:b]) - (e_theta[b:] - e_ref[b:])
        preference = -F.logsigmoid(-self.settings.beta * gap).mean()
        sft = sft_errors.mean()
        loss = preference + self.settings.sft_weight * sft
        won = (gap < 0).float().mean()
        return loss, {"loss": float(loss.detach()), "dpo": float(preference.detach()), "fm_winner": float(sft.detach()),
                      "fm_loser": float(e_theta[b:].mean().detach()), "pair_accuracy": float(won)}
