"""The built-in model: small weights trained here from material we may ship, inside the package.

It serves when no official weights are configured, so a fresh machine (no download, no GPU) shows a face
that talks and listens. Its sizes are model/configs/builtin.json (`--config builtin`, the schema of a golden
folder's small_config.json); its weights are `builtin/model.safetensors` (the whole model under official
names); how they were made and what they can and cannot do: `builtin/MODEL_CARD.md`.
`scripts/train-builtin.sh` makes them from scratch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from avatar_forcing.model.config import BUILTIN_CONFIG

NAME = "builtin"
FOLDER_NAME = "builtin"
WEIGHTS_NAME = "model.safetensors"


def folder() -> Path:
    return Path(str(resources.files("avatar_forcing.weights"))) / FOLDER_NAME


def config_file() -> Path:
    return BUILTIN_CONFIG


def weights_file() -> Path:
    return folder() / WEIGHTS_NAME


def available() -> bool:
    """Whether this install carries the built-in weights (an install without package data would not)."""
    return config_file().is_file() and weights_file().is_file()


def describe() -> str:
    return (f"the built-in model ({weights_file().stat().st_size / 1e6:.0f} MB, trained here on rigged public-domain "
            f"portraits; {FOLDER_NAME}/MODEL_CARD.md)")


def stands_in(config: str | None, weights: str | None) -> bool:
    """Whether the built-in model serves in place of an unconfigured official one: nothing chosen (`config`
    official or empty, no `weights`: the caller folds $AVATAR_FORCING_WEIGHTS in), the official files not in
    the Hugging Face cache, and the built-in weights present. Anything configured is left as it is."""
    from . import hub  # hub resolves the name `builtin` through this module

    if config not in (None, "", "official") or weights:
        return False
    return bool(hub.missing_from_cache()) and available()


def notice() -> str:
    """The one line that says the built-in model stands in, and where the real avatar is."""
    from . import hub

    return (f"no official weights configured or cached: using {describe()}. For the real avatar: the official "
            f"weights (about {hub.total_mb()} MB, non-commercial, a GPU for real time): README, "
            f"\u201cOfficial weights\u201d.")
