"""Typed configuration of the Avatar Forcing networks and sampler.

Every width, depth and table the networks use is read from here; nothing in `model/` hard-codes a size
of the official configuration. `official()` is the released `configs/inference.yaml` (MODEL_SPEC §0),
`from_golden_dir()` reads a reference folder's `small_config.json` and `builtin` names the built-in model's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# The built-in model's sizes (`--config builtin`; its weights are weights/builtin).
BUILTIN_CONFIG = Path(__file__).resolve().parent / "configs" / "builtin.json"

# The appearance encoder / synthesis decoder resolution -> channels table of LIA (channel_multiplier 1).
OFFICIAL_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}


@dataclass(frozen=True)
class MotionAutoencoderConfig:
    """The LIA motion auto-encoder: frame size, the style and motion widths, the channel table per resolution."""

    input_size: int = 512
    style_dim: int = 512  # dim_w: width of the identity / motion latents
    motion_dim: int = 20  # dim_m: number of orthonormal motion directions
    channels: dict[int, int] = field(default_factory=lambda: dict(OFFICIAL_CHANNELS))
    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)
    # The decoder reports the warping grid of this level (the reference hard-codes 64).
    flow_resolution: int = 64
    # Not in the reference (which is False): every frame gets back the fine detail its decoding of the portrait
    # misses (the portrait minus that decoding), moved by the frame's warp at `flow_resolution`. A small
    # decoder (the built-in model's) blurs wrinkles, glasses and hair; with it the first frames are the
    # portrait itself (docs/training.md §6).
    portrait_detail: bool = False
    # Not in the reference (which is False): every portrait is animated in the training faces' code (their mean
    # appearance code and motion code, buffers set by `avatar-forcing train canonical-code`), so the decoder's
    # style and warps and the transformer's reference motion stay where they were trained, and the portrait
    # brings only its feature maps and, through `portrait_detail`, itself. Made for a model trained on few
    # faces (the built-in one), whose codes of an unseen face are far from anything it learnt from.
    canonical_code: bool = False
    # With canonical_code: the user's webcam codes are taken relative to the user's own running mean and added
    # to the canonical motion (canonical.py), rather than used as they are.
    relative_user_motion: bool = False
    # With canonical_code, instead of relative_user_motion: the user's motion latents are read from their
    # webcam by the face mesh, as the training faces' latents of the same expression (model/user_expression.py;
    # maps set by `avatar-forcing train user-expression`). For a model whose encoder knows few faces.
    user_expression: bool = False

    def __post_init__(self) -> None:
        size = self.input_size
        if size < 8 or size & (size - 1):
            raise ValueError(f"input_size must be a power of two >= 8, got {size}")
        missing = [r for r in self.resolutions() if r not in self.channels]
        if missing:
            raise ValueError(f"channel table has no entry for resolutions {missing}")
        if self.portrait_detail and self.flow_resolution not in self.resolutions()[1:]:
            raise ValueError(f"portrait_detail moves the detail by the warp at flow_resolution "
                             f"{self.flow_resolution}, which a {size} px decoder does not have")
        if self.canonical_code and not self.portrait_detail:
            raise ValueError("canonical_code needs portrait_detail: without the portrait's own detail every "
                             "portrait would be drawn in the training faces' appearance")
        if self.relative_user_motion and not self.canonical_code:
            raise ValueError("relative_user_motion needs canonical_code: the user's motion is added to the "
                             "canonical motion code")
        if self.user_expression and not self.canonical_code:
            raise ValueError("user_expression needs canonical_code: the user's expression is added to the "
                             "canonical motion code")
        if self.user_expression and self.relative_user_motion:
            raise ValueError("user_expression and relative_user_motion are two ways to read the user's webcam: "
                             "turn one of them off")

    @property
    def log_size(self) -> int:
        return self.input_size.bit_length() - 1

    def resolutions(self) -> list[int]:
        """4, 8, ..., input_size."""
        return [2**i for i in range(2, self.log_size + 1)]


@dataclass(frozen=True)
class AudioEncoderConfig:
    """wav2vec2's configuration (a Wav2Vec2Config dict), the projected width dim_a and the audio rates."""

    # transformers.Wav2Vec2Config(**wav2vec2) builds the backbone; empty = the default (base) architecture.
    wav2vec2: dict[str, Any] = field(default_factory=dict)
    dim_a: int = 512  # width of the projected audio features
    only_last_features: bool = False
    sampling_rate: int = 16000
    fps: int = 25
    attn_implementation: str = "sdpa"

    def backbone_config(self):
        from transformers import Wav2Vec2Config

        cfg = Wav2Vec2Config(**{k: v for k, v in self.wav2vec2.items() if k not in _HF_BOOKKEEPING})
        cfg._attn_implementation = self.attn_implementation
        return cfg

    @property
    def samples_per_frame(self) -> int:
        if self.sampling_rate % self.fps:
            raise ValueError("sampling_rate must be a multiple of fps")
        return self.sampling_rate // self.fps

    def projection_in_features(self) -> int:
        cfg = self.backbone_config()
        layers = 1 if self.only_last_features else cfg.num_hidden_layers
        return layers * cfg.hidden_size


_HF_BOOKKEEPING = {"transformers_version", "_name_or_path", "architectures", "model_type", "dtype"}


@dataclass(frozen=True)
class FlowTransformerConfig:
    """The causal DFoT: widths, depth, heads, and the streaming geometry (clip, block, context, caches)."""

    dim_w: int = 512  # motion latent width (the generated x and the reference motion r_s)
    dim_a: int = 512  # audio / condition width entering the dual motion encoder
    dim_h: int = 1024  # hidden width
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    condition_heads: int = 4  # heads of the dual motion encoder's two attentions (hard-coded 4 upstream)
    frequency_embedding_size: int = 256
    max_period: float = 10000.0
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024  # the reference table size; the engine rebases positions below this
    clip_frames: int = 50  # sec * fps: the priming window
    block_frames: int = 10  # frames generated per streaming block
    context_frames: int = 2  # clean frames of the previous block re-fed as context
    lookahead: int = 2  # self-attention: key k visible to query q when k <= q + lookahead
    attention_window: int = 2  # cross-attention: |k - q| <= window (priming)
    stream_cross_window: int = 2  # cross-attention expansion in streaming blocks
    # Not in the reference (which is False): the dual motion encoder also adds a projection of the user state
    # per frame (zero at start). There the avatar's audio is the only query, so with it null (the user-only
    # guidance branch) every frame gets the same condition and the user's timing is lost (docs/training.md §6).
    user_residual: bool = False

    def __post_init__(self) -> None:
        if self.dim_h % self.num_heads:
            raise ValueError("dim_h must be divisible by num_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.dim_a % self.condition_heads:
            raise ValueError("dim_a must be divisible by condition_heads")
        if (self.clip_frames - self.block_frames) <= self.context_frames:
            raise ValueError("clip_frames - block_frames must exceed context_frames")

    @property
    def head_dim(self) -> int:
        return self.dim_h // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim_h * self.mlp_ratio)

    @property
    def block_tokens(self) -> int:
        """Tokens of a streaming block: context frames + new frames."""
        return self.context_frames + self.block_frames

    @property
    def self_cache_len(self) -> int:
        """Cached self-attention frames (38 in the reference: clip - block - context)."""
        return self.clip_frames - self.block_frames - self.context_frames

    @property
    def cross_cache_len(self) -> int:
        return self.stream_cross_window

    @property
    def rebase_position(self) -> int:
        """Where a rebased block's first token lands: the first streaming block's own position (48)."""
        return self.clip_frames - self.context_frames


@dataclass(frozen=True)
class SamplerConfig:
    """Flow-matching sampling: function evaluations per block and the two guidance scales."""

    nfe: int = 10  # the reference runs nfe - 1 transformer calls per block
    num_train_timesteps: int = 1000
    a_cfg_scale: float = 2.0  # avatar-audio guidance
    u_cfg_scale: float = 1.0  # user (audio + motion) guidance


@dataclass(frozen=True)
class AvatarForcingConfig:
    """Every size and rate of a model; built by `official()` or from a reference folder (`from_golden_dir`)."""

    motion: MotionAutoencoderConfig = field(default_factory=MotionAutoencoderConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    transformer: FlowTransformerConfig = field(default_factory=FlowTransformerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    name: str = "official"

    @property
    def fps(self) -> int:
        return self.audio.fps

    @property
    def sampling_rate(self) -> int:
        return self.audio.sampling_rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def official() -> AvatarForcingConfig:
    """The released configuration (configs/inference.yaml, wav2vec2-base-960h architecture)."""
    return AvatarForcingConfig()


def from_reference_options(opts: dict[str, Any], *, channels: dict[int, int] | None = None,
                           wav2vec2: dict[str, Any] | None = None, name: str = "custom") -> AvatarForcingConfig:
    """Build a config from the reference's option names (the keys of configs/inference.yaml)."""
    fps = int(opts.get("fps", 25))
    sec = int(opts.get("sec", 2))
    dim_w = int(opts.get("dim_w", 512))
    dim_a = int(opts.get("dim_a", 512))
    motion = MotionAutoencoderConfig(
        input_size=int(opts.get("input_size", 512)),
        style_dim=dim_w,
        motion_dim=int(opts.get("dim_m", 20)),
        channels=dict(channels or OFFICIAL_CHANNELS),
    )
    audio = AudioEncoderConfig(
        wav2vec2=dict(wav2vec2 or {}),
        dim_a=dim_a,
        only_last_features=bool(opts.get("only_last_features", False)),
        sampling_rate=int(opts.get("sampling_rate", 16000)),
        fps=fps,
    )
    transformer = FlowTransformerConfig(
        dim_w=dim_w,
        dim_a=dim_a,
        dim_h=int(opts.get("dim_h", 1024)),
        depth=int(opts.get("transformer_depth", 8)),
        num_heads=int(opts.get("num_heads", 8)),
        mlp_ratio=float(opts.get("mlp_ratio", 4.0)),
        clip_frames=sec * fps,
        block_frames=int(opts.get("num_frames_per_block", 10)),
        attention_window=int(opts.get("attention_window", 2)),
    )
    sampler = SamplerConfig(
        nfe=int(opts.get("nfe", 10)),
        num_train_timesteps=int(opts.get("num_train_timestep", 1000)),
        a_cfg_scale=float(opts.get("a_cfg_scale", 2.0)),
        u_cfg_scale=float(opts.get("u_cfg_scale", 1.0)),
    )
    return AvatarForcingConfig(motion=motion, audio=audio, transformer=transformer, sampler=sampler, name=name)


def from_golden_dir(folder: str | Path) -> AvatarForcingConfig:
    """Read a reference golden folder's `small_config.json` (channel table, widths, wav2vec2 config)."""
    path = Path(folder) / "small_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a golden reference folder")
    return from_config_file(path, default_name=str(folder))


# Our own options beyond the reference's: name -> (the part of the configuration it belongs to, its JSON type).
EXTENSIONS = {"user_residual": ("transformer", bool), "portrait_detail": ("motion", bool),
              "canonical_code": ("motion", bool), "relative_user_motion": ("motion", bool),
              "user_expression": ("motion", bool)}


def from_config_file(path: str | Path, default_name: str = "custom") -> AvatarForcingConfig:
    """A configuration file in the schema of a golden folder's `small_config.json`: the reference's options,
    the auto-encoder's channel table, wav2vec2's config dict and, optionally, the recorded sampling settings."""
    raw = json.loads(Path(path).read_text())
    opts = raw["model_config_as_passed_to_the_code"]
    mae = raw["motion_autoencoder"]
    table_key = next(k for k in mae if k.startswith("channel_table"))
    channels = {int(k): int(v) for k, v in mae[table_key].items()}
    w2v = raw["audio_encoder"]["wav2vec2_config_to_dict"]
    cfg = from_reference_options(opts, channels=channels, wav2vec2=w2v, name=raw.get("name", default_name))
    blur = tuple(mae.get("blur_kernel", (1, 3, 3, 1)))
    if blur != cfg.motion.blur_kernel:
        cfg = replace(cfg, motion=replace(cfg.motion, blur_kernel=blur))
    # Our own architecture options, beyond the reference's (the built-in model's file has them).
    extensions = raw.get("extensions", {})
    unknown = set(extensions) - set(EXTENSIONS)
    if unknown:
        raise ValueError(f"unknown extensions {sorted(unknown)}; known: {list(EXTENSIONS)}")
    mistyped = [k for k, v in extensions.items() if type(v) is not EXTENSIONS[k][1]]
    if mistyped:  # bool("false") would be True: take JSON's own types only
        raise ValueError(f"extensions {mistyped} must be JSON {[EXTENSIONS[k][1].__name__ for k in mistyped]}")
    for part in ("transformer", "motion"):
        mine = {k: v for k, v in extensions.items() if EXTENSIONS[k][0] == part}
        if mine:
            cfg = replace(cfg, **{part: replace(getattr(cfg, part), **mine)})
    # The sampling settings the reference run recorded take precedence over the option defaults.
    used = raw.get("sampling_used_for_case_sample", {})
    recorded = {k: type(getattr(cfg.sampler, k))(used[k]) for k in ("nfe", "a_cfg_scale", "u_cfg_scale") if k in used}
    return replace(cfg, sampler=replace(cfg.sampler, **recorded))


def config_from_name(value: str | None) -> AvatarForcingConfig:
    """A configuration named on a command line or in a setting: `official` (the default), `builtin` (the
    built-in model's sizes, model/configs/builtin.json) or a golden folder holding `small_config.json`."""
    from avatar_forcing.errors import UserError

    if value in (None, "", "official"):
        return official()
    if value == "builtin":
        if not BUILTIN_CONFIG.is_file():
            raise UserError(f"--config builtin: {BUILTIN_CONFIG} is missing from this install")
        return from_config_file(BUILTIN_CONFIG, default_name="builtin")
    if not (Path(value) / "small_config.json").is_file():
        raise UserError(f"--config {value}: expected 'official', 'builtin' or a folder with a small_config.json")
    try:
        return from_golden_dir(value)
    except (KeyError, ValueError) as exc:
        raise UserError(f"--config {value}: its small_config.json is not readable ({exc})") from exc

