"""`avatar-forcing weights verify`: are the checkpoint files on disk complete and right for a configuration?

Per file: present, expected size (where the registry knows it), parses, and names / shapes / dtypes fit the
model built on `meta` (no memory for weights). The values of derived buffers (masks, FIR kernels) need a
materialised model and are checked when the weights are actually loaded (`load_model`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from avatar_forcing.errors import WeightsError
from avatar_forcing.model.avatar_forcing import build_model
from avatar_forcing.model.config import AvatarForcingConfig, config_from_name

from .convert import load_state_dict_file
from .hub import HUB, how_to_get, locate, locate_config, weights_source
from .loading import LoadReport, check_state_dict, map_wav2vec2_key, normalize_key, resolve_config
from .registry import CHECKPOINTS, WAV2VEC2, Checkpoint

OK = "ok"


@dataclass
class FileCheck:
    label: str
    path: Path | None
    status: str  # ok | missing | wrong size | unreadable | mismatch
    detail: str = ""
    tensors: int = 0

    @property
    def ok(self) -> bool:
        return self.status == OK


def _size_problem(ckpt: Checkpoint | None, path: Path) -> str:
    if ckpt is None:
        return ""
    for w in ckpt.weights:
        if w.filename == path.name and w.size is not None and path.stat().st_size != w.size:
            return f"{path.stat().st_size} bytes, expected {w.size}: incomplete download? Download it again"
    return ""


def _check_file(label: str, path: Path, model, ckpt: Checkpoint | None) -> FileCheck:
    problem = _size_problem(ckpt, path)
    if problem:
        return FileCheck(label, path, "wrong size", problem)
    try:
        raw = load_state_dict_file(path)
    except WeightsError as exc:
        return FileCheck(label, path, "unreadable", str(exc))
    ignored: list[str] = []
    state_dict = {}
    for key, tensor in raw.items():
        name = map_wav2vec2_key(key) if ckpt is WAV2VEC2 else normalize_key(key)
        if name is None:
            ignored.append(key)
        else:
            state_dict[name] = tensor
    prefixes = ckpt.prefixes if ckpt is not None else None
    report: LoadReport = check_state_dict(model, state_dict, prefixes=prefixes, ignored=ignored)
    if prefixes is not None:  # tensors of another component do not belong in this file
        report.unexpected += [n for n in state_dict if not n.startswith(prefixes) and n not in report.unexpected]
    if not report.ok:
        return FileCheck(label, path, "mismatch", "; ".join(report.problems()), len(raw))
    detail = f"{len(ignored)} ignored ({', '.join(ignored[:3])})" if ignored else ""
    return FileCheck(label, path, OK, detail, len(raw))


def verify(weights: str | os.PathLike | None, cfg: AvatarForcingConfig, *,
           cache_dir: str | os.PathLike | None = None) -> tuple[list[FileCheck], AvatarForcingConfig]:
    """Check the files `load_model(cfg, weights)` would use, without downloading anything."""
    source = weights_source(weights)
    if source != HUB and Path(source).is_file():
        model = build_model(cfg, "meta")
        return [_check_file(Path(source).name, Path(source), model, None)], cfg
    if source != HUB and not Path(source).is_dir():
        raise WeightsError(f"weights {source}: no such file or directory")
    directory = None if source == HUB else source
    located = {ckpt.name: locate(ckpt, directory, cache_dir) for ckpt in CHECKPOINTS}
    rows: list[FileCheck] = []
    config_path = locate_config(WAV2VEC2, located[WAV2VEC2.name])
    try:
        cfg = resolve_config(cfg, config_path)
    except WeightsError as exc:
        rows.append(FileCheck(f"{WAV2VEC2.name} config", config_path, "unreadable", str(exc)))
    model = build_model(cfg, "meta")
    for ckpt in CHECKPOINTS:
        path = located[ckpt.name]
        if path is None:
            where = f"in {directory}" if directory is not None else "in the hub cache"
            rows.append(FileCheck(ckpt.name, None, "missing", f"{' or '.join(ckpt.local_names)} not found {where}"))
        else:
            rows.append(_check_file(ckpt.name, path, model, ckpt))
    return rows, cfg


def _size(path: Path | None) -> str:
    if path is None or not path.is_file():
        return "-"
    return f"{path.stat().st_size / 1e6:.1f} MB"


def print_table(rows: list[FileCheck], cfg: AvatarForcingConfig, out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up per call: sys.stdout may have been replaced since import
    print(f"configuration: {cfg.name}", file=out)
    width = max(len(r.label) for r in rows)
    print(f"{'checkpoint':<{width}}  {'status':<10}  {'size':>10}  {'tensors':>7}  file", file=out)
    for r in rows:
        print(f"{r.label:<{width}}  {r.status:<10}  {_size(r.path):>10}  {r.tensors or '-':>7}  {r.path or '-'}",
              file=out)
    for r in rows:
        if r.detail:
            print(f"  {r.label}: {r.detail}", file=out)
    if any(r.status == "missing" for r in rows):
        print(f"  to get missing files: {how_to_get()}", file=out)


def run_verify(weights: str | os.PathLike | None, config: str | None, *,
               cache_dir: str | os.PathLike | None = None, out: TextIO | None = None) -> int:
    rows, cfg = verify(weights, config_from_name(config), cache_dir=cache_dir)
    print_table(rows, cfg, out)
    return 0 if all(r.ok for r in rows) else 1
