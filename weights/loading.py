"""Put checkpoint tensors into an `AvatarForcing` model, refusing anything that does not fit.

The reference copies whatever parameter names it finds and silently skips the rest; here every missing,
unexpected or mis-shaped tensor is reported by name. Two kinds of state-dict entries are treated specially:

* derived buffers (the attention masks and the blur / upsample FIR kernels) are constants the model
  computes from its configuration. The official files may omit them (the reference never loads buffers);
  when a file has them they must equal the model's own values, else the file was made for another config.
* keys dropped on purpose (`ignored`): the CTC head `lm_head.*` of the wav2vec2-base-960h checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from avatar_forcing.errors import WeightsError
from avatar_forcing.model.avatar_forcing import AvatarForcing, build_model
from avatar_forcing.model.config import AvatarForcingConfig

from .convert import load_state_dict_file
from .hub import HUB, OfficialFiles, official_files_from_hub, official_files_in_dir, weights_source
from .registry import WAV2VEC2

__all__ = ["LoadReport", "check_state_dict", "is_derived_buffer", "load_into", "load_model",
           "load_state_dict_file", "map_wav2vec2_key", "normalize_key", "official_state_dict",
           "resolve_config"]

log = logging.getLogger(__name__)

W2V = "audio_encoder.wav2vec2."
_DERIVED_MASKS = {"flow_transformer.alignment_mask", "flow_transformer.block_bidir_causal_lookahead_mask"}
# Parameters inference never reads: tolerated when absent (they keep their initial values).
_UNUSED_AT_INFERENCE = {W2V + "masked_spec_embed"}
# Old (torch.nn.utils.weight_norm) -> new (parametrizations.weight_norm) names of the positional conv.
_WEIGHT_NORM_RENAMES = {
    "encoder.pos_conv_embed.conv.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv_embed.conv.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
}
_IGNORED_PREFIXES = ("lm_head.",)  # Wav2Vec2ForCTC's character classifier: we only use the encoder
_LIST_LIMIT = 10


def is_derived_buffer(name: str) -> bool:
    """Masks and FIR kernels: recomputed from the config, so optional in a checkpoint."""
    return name in _DERIVED_MASKS or (name.startswith("motion_autoencoder.") and name.endswith(".kernel"))


def normalize_key(name: str) -> str:
    """Official name with the current transformers spelling of the wav2vec2 weight-norm parameters."""
    if name.startswith(W2V):
        rest = name[len(W2V):]
        return W2V + _WEIGHT_NORM_RENAMES.get(rest, rest)
    return name


def map_wav2vec2_key(key: str) -> str | None:
    """A key of a transformers wav2vec2 checkpoint -> our official name; None = deliberately ignored.

    Accepts Wav2Vec2ForCTC keys (`wav2vec2.encoder...`), bare Wav2Vec2Model keys (`encoder...`) and keys
    already under the official prefix. Anything unknown keeps a mapped name so it is reported as unexpected.
    """
    if key.startswith(_IGNORED_PREFIXES):
        return None
    if key.startswith(W2V):
        return normalize_key(key)
    if key.startswith("wav2vec2."):
        key = key[len("wav2vec2."):]
    return normalize_key(W2V + key)


# -- reading the official files ---------------------------------------------------------------------------


def official_state_dict(files: OfficialFiles, *, ignored: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Merge the three official files under official names. Dropped keys are appended to `ignored`."""
    merged: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for ckpt, path in files.items():
        part = load_state_dict_file(path)
        for key, tensor in part.items():
            name = map_wav2vec2_key(key) if ckpt is WAV2VEC2 else normalize_key(key)
            if name is None:
                if ignored is not None:
                    ignored.append(f"{path.name}:{key}")
                continue
            if name in merged:
                raise WeightsError(f"{name} is in both {origin[name]} and {path}; the official files hold "
                                   f"disjoint parts of the model: re-download them")
            merged[name] = tensor
            origin[name] = path
    return merged


def wav2vec2_config_dict(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable transformers config ({exc}); download it again") from exc
    if not isinstance(raw, dict) or raw.get("model_type", "wav2vec2") != "wav2vec2":
        raise WeightsError(f"{path} is not a wav2vec2 config (model_type {raw.get('model_type')!r})"
                           if isinstance(raw, dict) else f"{path} is not a JSON object")
    return raw


def resolve_config(cfg: AvatarForcingConfig, wav2vec2_config: Path | None) -> AvatarForcingConfig:
    """The official config leaves the wav2vec2 architecture empty: take it from the checkpoint's config.json."""
    if cfg.audio.wav2vec2 or wav2vec2_config is None:
        return cfg
    audio = dataclasses.replace(cfg.audio, wav2vec2=wav2vec2_config_dict(wav2vec2_config))
    return dataclasses.replace(cfg, audio=audio)


# -- checking and loading ---------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _names(items: list[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


@dataclass
class LoadReport:
    """What a checkpoint did to a model. Names are official state-dict names."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: file [..] vs model [..]"
    buffer_mismatch: list[str] = field(default_factory=list)  # derived buffers whose values differ
    rebuilt: list[str] = field(default_factory=list)  # derived buffers absent from the file
    unused_missing: list[str] = field(default_factory=list)  # absent, but never read at inference
    ignored: list[str] = field(default_factory=list)  # dropped on purpose (lm_head.*)
    fresh: list[str] = field(default_factory=list)  # absent, allowed to keep their initial values (start_fresh)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.buffer_mismatch)

    def problems(self) -> list[str]:
        out = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("mis-shaped", self.mismatched), ("derived buffer differs from the config's",
                                                               self.buffer_mismatch)):
            if items:
                out.append(f"{len(items)} {label}: {_names(items)}")
        return out

    def summary(self) -> str:
        text = f"{len(self.loaded)} tensors loaded, {len(self.rebuilt)} derived buffers rebuilt"
        if self.ignored:
            text += f", {len(self.ignored)} ignored ({_names(self.ignored, 3)})"
        if self.unused_missing:
            text += f", absent but unused at inference: {_names(self.unused_missing)}"
        if self.fresh:
            text += f", {len(self.fresh)} absent and left at their initial values ({_names(self.fresh, 3)})"
        return text

    def raise_if_problems(self, what: str, config_name: str) -> None:
        if not self.ok:
            raise WeightsError(f"{what} does not fit the model configuration {config_name!r}: "
                               f"{'; '.join(self.problems())}. Check that the configuration matches the "
                               f"checkpoint, or download the checkpoint again")


def _dtype_fits(value: torch.Tensor, target: torch.Tensor) -> bool:
    if target.dtype == torch.bool:
        return value.dtype == torch.bool
    return value.dtype.is_floating_point == target.dtype.is_floating_point and not value.is_complex()


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *,
                     prefixes: tuple[str, ...] | None = None, ignored: list[str] | tuple[str, ...] = (),
                     start_fresh: tuple[str, ...] = ()) -> LoadReport:
    """Names, shapes and dtypes only: works on a model built on `meta`.

    With `prefixes`, only the model entries under them are expected (one file of several). Entries whose name
    contains one of `start_fresh`'s module names (".name.") may be absent: they keep the model's initial values.
    """
    targets = model.state_dict(keep_vars=True)
    report = LoadReport(ignored=list(ignored))
    for name in targets:
        if prefixes is not None and not name.startswith(prefixes):
            continue
        if name in state_dict:
            continue
        if is_derived_buffer(name):
            report.rebuilt.append(name)
        elif name in _UNUSED_AT_INFERENCE:
            report.unused_missing.append(name)
        elif any(f".{module}." in f".{name}" for module in start_fresh):
            report.fresh.append(name)
        else:
            report.missing.append(name)
    for name, value in state_dict.items():
        target = targets.get(name)
        if target is None:
            report.unexpected.append(name)
        elif value.shape != target.shape or not _dtype_fits(value, target):
            report.mismatched.append(f"{name}: file {_shape(value)} {str(value.dtype)[6:]} vs model "
                                     f"{_shape(target)} {str(target.dtype)[6:]}")
        else:
            report.loaded.append(name)
    return report


def _same_values(value: torch.Tensor, target: torch.Tensor) -> bool:
    value = value.to(device=target.device, dtype=target.dtype)
    if target.dtype.is_floating_point:
        return torch.allclose(value, target, rtol=1e-6, atol=1e-7)
    return torch.equal(value, target)


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], *, what: str = "checkpoint",
              ignored: list[str] | tuple[str, ...] = (), start_fresh: tuple[str, ...] = ()) -> LoadReport:
    """Check everything first, then copy tensor by tensor into the model's own storage (any device / dtype).

    Raises WeightsError naming every problem; the model is left untouched in that case.
    """
    report = check_state_dict(model, state_dict, ignored=ignored, start_fresh=start_fresh)
    targets = model.state_dict(keep_vars=True)
    for name in report.loaded:
        if is_derived_buffer(name):
            target = targets[name]
            if target.is_meta:
                continue  # nothing to compare against: a shape-only check
            if not _same_values(state_dict[name], target):
                report.buffer_mismatch.append(name)
    config = getattr(model, "config", None)
    report.raise_if_problems(what, getattr(config, "name", "?"))
    with torch.no_grad():
        for name in report.loaded:
            if not is_derived_buffer(name):  # derived buffers already hold these values
                targets[name].copy_(state_dict[name])
    return report


def _build(cfg: AvatarForcingConfig, device: torch.device | str, origin: str) -> AvatarForcing:
    try:
        return build_model(cfg, device)
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"cannot build the model from {origin}: {exc}") from exc


def load_model(cfg: AvatarForcingConfig, weights: str | os.PathLike | None, device: torch.device | str = "cpu",
               *, offline: bool | None = None, start_fresh: tuple[str, ...] = ()) -> AvatarForcing:
    """Build the model on `device` and fill it from checkpoints; the one entry point for the rest of the code.

    `weights`: None ($AVATAR_FORCING_WEIGHTS if set, else the hub), "hub" (the hub cache, downloading what is
    missing unless offline), a directory in the official layout (see `weights.hub`), or one
    `.safetensors` / `.pth` file holding the whole model under official names.

    The model is built directly on `device` (its derived buffers then come out right by construction) and
    tensors are copied into it one by one from memory-mapped files, so peak memory stays near one model.

    `start_fresh`: module names whose parameters may be absent from the checkpoint and then keep their initial
    values (training only: a configuration's extension layers on a checkpoint made without them).
    """
    source = weights_source(weights)
    ignored: list[str] = []
    if source != HUB and not Path(source).exists():
        raise WeightsError(f"weights {source}: no such file or directory. Pass 'hub', a directory in the official "
                           f"layout or one .safetensors / .pth file holding the whole model")
    # Files are read (memory-mapped, cheap) before the model is built, so a bad file fails fast.
    if source != HUB and Path(source).is_file():
        what = str(source)
        state_dict = {normalize_key(k): v for k, v in load_state_dict_file(source).items()}
        model = _build(cfg, device, "the configuration")
    else:
        files = (official_files_from_hub(offline=offline) if source == HUB
                 else official_files_in_dir(source))
        what = f"the official checkpoints ({files.motion_autoencoder.parent})"
        state_dict = official_state_dict(files, ignored=ignored)
        cfg = resolve_config(cfg, files.wav2vec2_config)
        model = _build(cfg, device, str(files.wav2vec2_config or "the configuration"))
    report = load_into(model, state_dict, what=what, ignored=ignored, start_fresh=start_fresh)
    del state_dict
    log.info("loaded %s: %s", what, report.summary())
    return model
