"""State-dict names and shapes: the official configuration (built on `meta`, nothing allocated) and each
golden folder's small configuration must have exactly the reference's parameters and persistent buffers."""

from __future__ import annotations

import csv

import pytest
import torch
from golden_data import golden_folders

from avatar_forcing.model.avatar_forcing import build_model
from avatar_forcing.model.config import from_golden_dir, official


def reference_entries(tsv_path) -> dict[str, tuple[tuple[int, ...], str]]:
    with open(tsv_path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {
        r["name"]: (tuple(int(x) for x in r["shape"].strip("[]").split(",") if x.strip()), r["dtype"])
        for r in rows if r["in_state_dict"] == "yes"
    }


def our_entries(model) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}


def compare(ours: dict, reference: dict) -> list[str]:
    problems = [f"missing: {k}" for k in reference.keys() - ours.keys()]
    problems += [f"unexpected: {k}" for k in ours.keys() - reference.keys()]
    problems += [f"{k}: ours {ours[k]} != reference {reference[k]}" for k in ours.keys() & reference.keys()
                 if ours[k] != reference[k]]
    return sorted(problems)


def existing(name: str) -> list:
    found = [f / name for f in golden_folders() if (f / name).exists()]
    if not found:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no golden folder with {name}"))]
    return found


@pytest.mark.parametrize("tsv", existing("full_model_keys.tsv"))
def test_official_configuration_has_the_reference_state_dict(tsv):
    model = build_model(official(), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    reference = reference_entries(tsv)
    assert len(reference) == 575
    assert compare(our_entries(model), reference) == []
    # Parameter counts per top-level part (MODEL_SPEC §2).
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    assert counts["motion_autoencoder"] == 45_239_560
    assert counts["flow_transformer"] == 148_764_160
    assert sum(p.numel() for p in model.audio_encoder.audio_projection.parameters()) == 4_720_128


@pytest.mark.parametrize("tsv", existing("small_model_keys.tsv"))
def test_golden_configuration_has_the_reference_state_dict(tsv):
    model = build_model(from_golden_dir(tsv.parent), device="meta")
    assert compare(our_entries(model), reference_entries(tsv)) == []


def test_rope_tables_are_not_in_the_state_dict():
    model = build_model(official(), device="meta")
    assert not any("rope" in k or "freqs_cis" in k for k in model.state_dict())
    rope = model.flow_transformer.rope
    assert rope.dtype == torch.float32 and tuple(rope.shape) == (1024, 64, 2)  # (cos, sin) per position
