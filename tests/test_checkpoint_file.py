"""Checkpoint files have reproducible bytes (model/checkpoint_file.py)."""

from __future__ import annotations

import hashlib

import torch
from safetensors import safe_open

from avatar_forcing.model.checkpoint_file import write_safetensors


def test_same_tensors_and_metadata_give_the_same_bytes_and_load_back(tmp_path):
    tensors = {"b.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "a.bias": torch.ones(5),
               "c": torch.tensor([1, 2, 3], dtype=torch.int64)}
    metadata = {f"key{i}": f"value {i} ü" for i in range(8)} | {"format": "pt"}
    digests = set()
    for i in range(6):  # the library alone orders these keys differently almost every time
        path = write_safetensors(tensors, tmp_path / f"m{i}.safetensors", metadata)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1, f"{len(digests)} different files from the same tensors"
    assert not list(tmp_path.glob("*.partial"))
    with safe_open(tmp_path / "m0.safetensors", "pt") as f:
        assert f.metadata() == metadata
        assert sorted(f.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)
