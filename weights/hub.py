"""Find the official checkpoint files: in a local directory, in the Hugging Face cache, or by downloading them.

Local directory layout (the reference's `pretrained_dir`):

    DIR/motion_autoencoder.pth        (or .safetensors, see `avatar-forcing weights convert`)
    DIR/flow_transformer.pth          (or .safetensors)
    DIR/wav2vec2-base-960h/config.json
    DIR/wav2vec2-base-960h/model.safetensors   (or pytorch_model.bin)

Downloads go through huggingface_hub (its cache, its progress bars, HF_TOKEN, HF_ENDPOINT). The cache
folder and offline mode are read from the environment at call time rather than at import time, so a
process (or a test) that sets HF_HUB_CACHE / HF_HUB_OFFLINE after importing huggingface_hub is obeyed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from avatar_forcing.errors import WeightsError

from . import builtin
from .registry import CHECKPOINTS, FLOW_TRANSFORMER, MOTION_AUTOENCODER, WAV2VEC2, Checkpoint

log = logging.getLogger(__name__)

WEIGHTS_ENV = "AVATAR_FORCING_WEIGHTS"
HUB = "hub"


@dataclass(frozen=True)
class OfficialFiles:
    """Paths of the three official checkpoints (and of wav2vec2's transformers config, when there is one)."""

    motion_autoencoder: Path
    flow_transformer: Path
    wav2vec2: Path
    wav2vec2_config: Path | None = None

    def items(self) -> list[tuple[Checkpoint, Path]]:
        return [(MOTION_AUTOENCODER, self.motion_autoencoder), (FLOW_TRANSFORMER, self.flow_transformer),
                (WAV2VEC2, self.wav2vec2)]


# -- environment ------------------------------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline(offline: bool | None = None) -> bool:
    """An explicit choice wins; otherwise HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now."""
    if offline is not None:
        return offline
    from huggingface_hub import constants

    return (_truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
            or constants.HF_HUB_OFFLINE)


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub cache folder, with huggingface_hub's precedence (HF_HUB_CACHE > HF_HOME > XDG_CACHE_HOME)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def weights_source(weights: str | os.PathLike | None) -> str | Path:
    """`None` -> $AVATAR_FORCING_WEIGHTS if set, else the hub; "hub" -> the hub; "builtin" -> the built-in
    model's file; anything else -> a path."""
    if weights is None or str(weights) == "":
        weights = os.environ.get(WEIGHTS_ENV) or HUB
    if isinstance(weights, str) and weights == HUB:
        return HUB
    if isinstance(weights, str) and weights == builtin.NAME:
        return builtin.weights_file()
    return Path(weights).expanduser()


def layout_hint() -> str:
    return (f"motion_autoencoder.pth, flow_transformer.pth and {WAV2VEC2.subdir}/ "
            f"(config.json + model.safetensors or pytorch_model.bin)")


def how_to_get() -> str:
    # Worded to be right where it is printed: after a failed download too, it sends the person to a
    # machine that reaches the hub and back with a folder, not to the command that just failed.
    return (f"get the files where the Hugging Face hub is reachable (`avatar-forcing weights download --dir DIR`, "
            f"about {total_mb()} MB), copy DIR here ({layout_hint()}) and pass --weights DIR or set "
            f"{WEIGHTS_ENV}=DIR; HF_ENDPOINT selects a hub mirror")


def total_mb() -> int:
    return sum(c.approx_mb or 0 for c in CHECKPOINTS)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be reached now (one TCP connection, at most `timeout_s`), or None if it can.

    Checked before a download so that a machine without network hears so in seconds, instead of after
    huggingface_hub's retries (about 20 s per file) and with a half-made download folder left behind.
    """
    import socket
    import threading
    from urllib.parse import urlsplit

    url = urlsplit(hub_endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}:{port}: {exc.strerror or exc}")

    # A thread bounds the name lookup too, which the socket timeout does not cover.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {timeout_s:.0f} s"


def missing_from_cache(cache_dir: str | os.PathLike | None = None) -> list[Checkpoint]:
    """The official checkpoints not yet in the hub cache (never downloads)."""
    return [ckpt for ckpt in CHECKPOINTS if cached_file(ckpt, cache_dir) is None]


def check_reachable(missing: list[Checkpoint], offline: bool, where: str, advice: bool = True) -> None:
    """Before downloading `missing`: fail at once, in one message, when the hub cannot be reached."""
    if not missing:
        return
    then = f"; {how_to_get()}" if advice else ""
    what = "; ".join(f"{c.repo_id}: {' or '.join(w.filename for w in c.weights)}" for c in missing)
    if offline:
        raise WeightsError(f"the official weights are not in {where} (missing {what}) and offline mode is "
                           f"on (HF_HUB_OFFLINE){then}")
    why = hub_unreachable()
    if why is not None:
        raise WeightsError(f"the official weights are not in {where} (missing {what}) and the Hugging Face "
                           f"hub cannot be reached ({why}){then}")


def preflight(weights: str | os.PathLike | None, advice: bool = True) -> str:
    """Where the official weights will come from, checked without downloading or loading anything, so a
    server that cannot get them says so before it starts. Raises WeightsError (with what to do, unless
    `advice` is False: the caller gives its own)."""
    source = weights_source(weights)
    if source != HUB:
        if Path(source).is_file():
            return f"the weights file {source}"
        official_files_in_dir(source)  # raises, naming what is missing
        return f"the weights directory {source}"
    missing = missing_from_cache()
    if not missing:
        return f"the Hugging Face cache ({hub_cache_dir()})"
    check_reachable(missing, is_offline(), f"the Hugging Face cache at {hub_cache_dir()}", advice)
    mb = sum(c.approx_mb or 0 for c in missing)
    return f"the hub: {', '.join(c.name for c in missing)} (about {mb} MB) download first, into {hub_cache_dir()}"


# -- a local directory ------------------------------------------------------------------------------------


def _folder(directory: Path, ckpt: Checkpoint) -> Path:
    return directory / ckpt.subdir if ckpt.subdir else directory


def local_file(directory: Path, ckpt: Checkpoint) -> Path | None:
    """The first accepted weight file of `ckpt` present in the official layout under `directory`."""
    for name in ckpt.local_names:
        path = _folder(directory, ckpt) / name
        if path.is_file():
            return path
    return None


def local_config(directory: Path, ckpt: Checkpoint) -> Path | None:
    if not ckpt.config_file:
        return None
    path = _folder(directory, ckpt) / ckpt.config_file
    return path if path.is_file() else None


def official_files_in_dir(directory: str | os.PathLike) -> OfficialFiles:
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise WeightsError(f"weights directory {directory} does not exist; {how_to_get()}")
    found: dict[str, Path] = {}
    missing: list[str] = []
    for ckpt in CHECKPOINTS:
        path = local_file(directory, ckpt)
        if path is None:
            prefix = f"{ckpt.subdir}/" if ckpt.subdir else ""
            missing.append(prefix + " or ".join(ckpt.local_names))
        else:
            found[ckpt.name] = path
    if missing:
        raise WeightsError(f"{directory} is not a complete Avatar Forcing weights directory: missing "
                           f"{'; '.join(missing)}. Expected {layout_hint()}; {how_to_get()}")
    return OfficialFiles(found[MOTION_AUTOENCODER.name], found[FLOW_TRANSFORMER.name], found[WAV2VEC2.name],
                         local_config(directory, WAV2VEC2))


# -- the hub ----------------------------------------------------------------------------------------------


class _NotAvailable(Exception):
    """This file is not on disk and could not be fetched (offline, no network, or not in the repository)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fetch(repo_id: str, filename: str, *, cache_dir: Path, local_dir: Path | None, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    try:
        path = hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_dir=local_dir,
                               local_files_only=offline)
    except EntryNotFoundError as exc:  # also LocalEntryNotFoundError: not cached and offline / no network
        raise _NotAvailable(_first_line(exc)) from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise WeightsError(f"cannot access the hub repository {repo_id}: {_first_line(exc)}. Log in with "
                           f"`hf auth login` or set HF_TOKEN if it needs access; or {how_to_get()}") from exc
    except (OSError, ValueError) as exc:  # network, disk full, bad endpoint...
        raise WeightsError(f"could not fetch {filename} from {repo_id}: {_first_line(exc)}; "
                           f"{how_to_get()}") from exc
    return Path(path)


def _on_disk(repo_id: str, filename: str, cache_dir: Path, local_dir: Path | None) -> bool:
    if local_dir is not None:
        return (local_dir / filename).is_file()
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir), str)


def cached_file(ckpt: Checkpoint, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The checkpoint's weight file if it is already in the hub cache (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    for w in ckpt.weights:
        hit = try_to_load_from_cache(ckpt.repo_id, w.filename, cache_dir=hub_cache_dir(cache_dir))
        if isinstance(hit, str):
            return Path(hit)
    return None


def fetch_checkpoint(ckpt: Checkpoint, *, cache_dir: str | os.PathLike | None = None,
                     local_dir: str | os.PathLike | None = None,
                     offline: bool | None = None) -> tuple[Path, Path | None]:
    """(weights file, config file or None) of one checkpoint: the copy on disk, else a download.

    With `local_dir` the files are downloaded into that folder (huggingface_hub's local-dir mode) instead
    of the cache. To refresh a file, delete it (or use `hf download`).
    """
    cache = hub_cache_dir(cache_dir)
    target = Path(local_dir).expanduser() if local_dir is not None else None
    offline = is_offline(offline)

    def get(name: str) -> Path:
        # A file already on disk is used as is: no revalidation round-trip (which, on a machine without
        # network but not marked offline, costs huggingface_hub's retries for every file).
        if target is not None and (target / name).is_file():
            return target / name
        cached = _on_disk(ckpt.repo_id, name, cache, target)
        if not cached and not offline:
            log.info("fetching %s from %s", name, ckpt.repo_id)
        return _fetch(ckpt.repo_id, name, cache_dir=cache, local_dir=target, offline=offline or cached)

    names = [w.filename for w in ckpt.weights]
    # Prefer an alternative already on disk: a cached pytorch_model.bin must not trigger a new download.
    order = sorted(names, key=lambda n: not _on_disk(ckpt.repo_id, n, cache, target))
    reasons: list[str] = []
    weights = None
    for name in order:
        try:
            weights = get(name)
            break
        except _NotAvailable as exc:
            reasons.append(f"{name}: {exc}")
    if weights is None:
        where = f"in {target}" if target is not None else f"in the Hugging Face cache at {cache}"
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline else f"download failed ({reasons[-1]})"
        raise WeightsError(f"{ckpt.name}: {' or '.join(names)} from hub repository {ckpt.repo_id} is not "
                           f"{where} and {why}; {how_to_get()}")
    config = None
    if ckpt.config_file:
        try:
            config = get(ckpt.config_file)
        except _NotAvailable as exc:
            raise WeightsError(f"{ckpt.name}: {ckpt.config_file} from hub repository {ckpt.repo_id} is not "
                               f"available ({exc}); {how_to_get()}") from exc
    return weights, config


def official_files_from_hub(*, cache_dir: str | os.PathLike | None = None, local_dir: str | os.PathLike | None = None,
                            offline: bool | None = None) -> OfficialFiles:
    """The official files from the hub cache, downloading what is missing unless offline.

    With `local_dir` they are placed in the official local layout under that folder instead.
    """
    if local_dir is None:
        missing, where = missing_from_cache(cache_dir), f"the Hugging Face cache at {hub_cache_dir(cache_dir)}"
    else:
        root = Path(local_dir).expanduser()
        missing, where = [c for c in CHECKPOINTS if local_file(root, c) is None], str(root)
    check_reachable(missing, is_offline(offline), where)
    got: dict[str, tuple[Path, Path | None]] = {}
    for ckpt in CHECKPOINTS:
        sub = None
        if local_dir is not None:
            sub = Path(local_dir).expanduser() / ckpt.subdir if ckpt.subdir else Path(local_dir).expanduser()
        got[ckpt.name] = fetch_checkpoint(ckpt, cache_dir=cache_dir, local_dir=sub, offline=offline)
    return OfficialFiles(got[MOTION_AUTOENCODER.name][0], got[FLOW_TRANSFORMER.name][0], got[WAV2VEC2.name][0],
                         got[WAV2VEC2.name][1])


def resolve_official_files(weights: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                           offline: bool | None = None) -> OfficialFiles:
    """`weights` None / "hub" / a directory in the official layout -> the three files."""
    source = weights_source(weights)
    if source == HUB:
        return official_files_from_hub(cache_dir=cache_dir, offline=offline)
    return official_files_in_dir(source)


def locate(ckpt: Checkpoint, directory: str | os.PathLike | None = None,
           cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Where a checkpoint is on disk right now (local directory, else hub cache), or None. Never downloads."""
    if directory is not None:
        return local_file(Path(directory).expanduser(), ckpt)
    return cached_file(ckpt, cache_dir)


def locate_config(ckpt: Checkpoint, weights_file: Path | None) -> Path | None:
    """The config file that sits next to a located weights file (same snapshot or folder), if any."""
    if not ckpt.config_file or weights_file is None:
        return None
    path = weights_file.parent / ckpt.config_file
    return path if path.is_file() else None
