"""Checkpoint file formats: read a `.pth` / `.bin` / `.safetensors` state dict, write safetensors.

Reading never runs pickled code (`torch.load(weights_only=True)`), and any failure to parse a file (truncated
download, wrong file, garbage) becomes a WeightsError naming the file instead of a traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from avatar_forcing.errors import WeightsError
from avatar_forcing.model.checkpoint_file import write_safetensors

from .hub import local_file
from .registry import CHECKPOINTS

log = logging.getLogger(__name__)

SAFETENSORS = ".safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Training scripts often save {"state_dict": sd} or {"model": sd}; unwrap one such level.
_WRAPPER_KEYS = ("state_dict", "model")


def _unreadable(path: Path, exc: BaseException) -> WeightsError:
    detail = str(exc).strip().splitlines()
    reason = detail[0] if detail else type(exc).__name__
    return WeightsError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {reason[:200]}); the file "
                        f"is probably truncated or corrupted: delete it and download it again")


def _read_torch(path: Path) -> object:
    try:
        # mmap keeps the tensors file-backed: no second in-memory copy of a 614 MB checkpoint.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as first:  # noqa: BLE001 - legacy (non-zip) files cannot be mmapped: retry plainly
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
            raise _unreadable(path, exc) from first


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise _unreadable(path, exc) from exc


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict (got {type(obj).__name__}); "
                           f"expected a mapping of parameter names to tensors")
    if not obj:
        raise WeightsError(f"{path} holds no tensors: download it again")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path} is not a plain state dict: {len(bad)} entries are not name -> tensor "
                           f"(e.g. {', '.join(bad[:5])})")
    return obj


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into {name: CPU tensor}, with its names exactly as stored."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"checkpoint file {path} does not exist")
    if path.suffix == SAFETENSORS:
        return _as_state_dict(_read_safetensors(path), path)
    return _as_state_dict(_read_torch(path), path)


def _unshared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage or are views: copy only those."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state_dict.items():
        ptr = tensor.untyped_storage().data_ptr()
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and \
            tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        if ptr in seen or not whole:
            tensor = tensor.clone().contiguous()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, *, source: str = "") -> Path:
    """Write atomically, with reproducible bytes (model/checkpoint_file.py); errors say what to check."""
    path = Path(path).expanduser()
    metadata = {"format": "pt"}
    if source:
        metadata["converted_from"] = source
    try:
        write_safetensors(_unshared(state_dict), path, metadata)
    except Exception as exc:  # noqa: BLE001 - SafetensorError (I/O inside the Rust writer) or OSError
        raise WeightsError(f"could not write {path}: {exc}; check the folder exists and has free space") from exc
    return path


def default_output(path: Path) -> Path:
    # transformers names converted weights model.safetensors, not pytorch_model.safetensors.
    if path.name == "pytorch_model.bin":
        return path.with_name("model.safetensors")
    return path.with_suffix(SAFETENSORS)


def convert_file(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> Path:
    """Convert one checkpoint to safetensors (same names and dtypes). Returns the output path."""
    src = Path(src).expanduser()
    out = Path(dst).expanduser() if dst is not None else default_output(src)
    if out.suffix != SAFETENSORS:
        raise WeightsError(f"output {out} must end in {SAFETENSORS}")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise WeightsError(f"{src} is already safetensors; pass -o OUT.safetensors to write a copy elsewhere")
    state_dict = load_state_dict_file(src)
    save_safetensors(state_dict, out, source=src.name)
    log.info("converted %s (%d tensors) -> %s", src, len(state_dict), out)
    return out


def convert_dir(directory: str | os.PathLike) -> list[Path]:
    """Convert the official `.pth` / `.bin` files of a directory in the official layout, next to themselves."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise WeightsError(f"{directory} is not a directory")
    done: list[Path] = []
    for ckpt in CHECKPOINTS:
        found = local_file(directory, ckpt)
        if found is None:
            continue
        # local_file prefers an existing .safetensors; look for the torch original explicitly.
        for w in ckpt.weights:
            src = found.parent / w.filename
            if src.suffix in TORCH_SUFFIXES and src.is_file():
                done.append(convert_file(src))
                break
    if not done:
        raise WeightsError(f"no official .pth / .bin checkpoint found in {directory} (expected "
                           f"motion_autoencoder.pth, flow_transformer.pth, wav2vec2-base-960h/pytorch_model.bin)")
    return done
