"""The streaming engine and the reference offline sampler are the same mathematics.

The golden case_sample's conditions and recorded noise are fed through the session API. Several sessions
run in the same engine, opened at different steps so that batched blocks mix sessions at different
positions (and priming rows with streaming rows in one step); every one must reproduce `out_latents`.
"""

from __future__ import annotations

import pytest
import torch
from golden_data import GoldenSet, assert_matches, golden_model, golden_sets

from avatar_forcing.model.engine import EngineSettings, PrecomputedInputs, StreamingEngine
from avatar_forcing.model.motion_autoencoder import PortraitCode

pytestmark = pytest.mark.parametrize("gs", golden_sets())


def open_golden_session(engine: StreamingEngine, gs: GoldenSet, session_id: str):
    case, enc = gs.case("sample"), gs.case("ae_encode")
    noises = iter([case[f"noise_{i}"] for i in range(sum(k.startswith("noise_") for k in case))])
    feats = [enc[f"feat_{i}"] for i in range(sum(k.startswith("feat_") for k in enc))]
    portrait = PortraitCode(enc["s_r"], feats, case["r_s"])
    inputs = PrecomputedInputs(case["avatar_wa"][0], case["user_wa"][0], case["user_motion"][0])
    return engine.open_session(portrait, inputs=inputs, noise=lambda shape: next(noises), session_id=session_id)


def test_engine_reproduces_the_reference_rollout(gs: GoldenSet):
    case = gs.case("sample")
    engine = StreamingEngine(golden_model(gs), EngineSettings(max_sessions=4, decode=False))
    latents: dict[str, list[torch.Tensor]] = {}
    batch_sizes = set()
    joins = {0: "a", 1: "b", 3: "c"}  # step index -> session opened before that step
    step = 0
    while step < 20:
        if step in joins:
            open_golden_session(engine, gs, joins[step])
        outputs = engine.step()
        for out in outputs:
            latents.setdefault(out.session_id, []).append(out.latents)
            batch_sizes.add(out.batch_size)
        for sid in [s.id for s in engine.sessions.values() if s.finished]:
            engine.close_session(sid)
        if not engine.sessions and step > max(joins):
            break
        step += 1
    assert set(latents) == {"a", "b", "c"}
    assert max(batch_sizes) > 1, "sessions were never batched together"
    for sid, blocks in latents.items():
        assert_matches(torch.cat(blocks)[None], case["out_latents"], gs.tolerance("sample"), f"session {sid}")
    assert engine.capacity_left == 4
