"""The checkpoints the official model needs, and where they come from (MODEL_SPEC §4).

Data only: resolving, downloading and checking live in `hub.py`, `loading.py` and `verify.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

# The hub mirror of the official files. The fork apolinario/AvatarForcing (app.py) fetches them with
# `hf_hub_download("multimodalart/AvatarForcingHelpers", "motion_autoencoder.pth")` and the same for
# "flow_transformer.pth": plain filenames at the root of the repository, no subfolder.
MIRROR_REPO = "multimodalart/AvatarForcingHelpers"
WAV2VEC2_REPO = "facebook/wav2vec2-base-960h"
# The subfolder that holds wav2vec2 in the official local layout (configs/inference.yaml: wav2vec_model_path).
WAV2VEC2_DIRNAME = "wav2vec2-base-960h"
# Files of a hub repository we never fetch: TensorFlow / Flax / Rust copies of the same weights.
SKIPPED_HUB_PATTERNS = ("*.h5", "*.msgpack", "*.ot")


@dataclass(frozen=True)
class WeightFile:
    """One file of a checkpoint, as named in its hub repository."""

    filename: str
    size: int | None = None  # exact bytes; None where nobody has published them
    sha256: str | None = None  # None: unknown (no published digest)


@dataclass(frozen=True)
class Checkpoint:
    name: str
    repo_id: str
    # Alternative weight files in order of preference: the first one present is used.
    weights: tuple[WeightFile, ...]
    # State-dict prefixes (official names) this checkpoint provides.
    prefixes: tuple[str, ...]
    license: str
    approx_mb: int | None = None  # for display only
    config_file: str | None = None  # e.g. the transformers config.json next to the weights
    subdir: str | None = None  # folder inside the official local layout; None = top level
    google_drive_id: str | None = None  # documentation only: we never download from Drive
    note: str = ""

    @property
    def local_names(self) -> tuple[str, ...]:
        """Accepted weight filenames in a local directory, converted safetensors first."""
        names: list[str] = []
        for w in self.weights:
            stem, _, suffix = w.filename.rpartition(".")
            if suffix in ("pth", "pt") and f"{stem}.safetensors" not in names:
                names.append(f"{stem}.safetensors")
            if w.filename not in names:
                names.append(w.filename)
        return tuple(names)


_AUTHORS_TERMS = ("weights of TaekyungKi/AvatarForcing (CVPR 2026); use follows the original authors' terms "
                  "(the mirror's model card says the same)")

MOTION_AUTOENCODER = Checkpoint(
    name="motion_autoencoder",
    repo_id=MIRROR_REPO,
    weights=(WeightFile("motion_autoencoder.pth"),),
    prefixes=("motion_autoencoder.",),
    license=_AUTHORS_TERMS,
    approx_mb=181,
    google_drive_id="1a0ZqX9GMrkb3JFQgOBmUB0V-Bpwtv4Hp",
    note="fp32 parameters of the motion auto-encoder (appearance encoder, motion MLP, synthesis decoder)",
)

FLOW_TRANSFORMER = Checkpoint(
    name="flow_transformer",
    repo_id=MIRROR_REPO,
    weights=(WeightFile("flow_transformer.pth"),),
    prefixes=("flow_transformer.", "audio_encoder.audio_projection."),
    license=_AUTHORS_TERMS,
    approx_mb=614,
    google_drive_id="1lchvHiDka0bBQ29bdY6lHxCyNGbGzvS_",
    note="fp32 parameters of the causal flow transformer and of the audio projection",
)

WAV2VEC2 = Checkpoint(
    name="wav2vec2-base-960h",
    repo_id=WAV2VEC2_REPO,
    weights=(WeightFile("model.safetensors"), WeightFile("pytorch_model.bin")),
    prefixes=("audio_encoder.wav2vec2.",),
    license="Apache-2.0 (facebook/wav2vec2-base-960h)",
    approx_mb=378,
    config_file="config.json",
    subdir=WAV2VEC2_DIRNAME,
    note="Wav2Vec2ForCTC checkpoint; its CTC head (lm_head.*) is not used and is dropped on load",
)

CHECKPOINTS: tuple[Checkpoint, ...] = (MOTION_AUTOENCODER, FLOW_TRANSFORMER, WAV2VEC2)


def get(name: str) -> Checkpoint:
    for ckpt in CHECKPOINTS:
        if ckpt.name == name:
            return ckpt
    raise KeyError(name)
