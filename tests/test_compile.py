"""Compiled steps: the whole denoising loop and the clean pass of every bucket and phase compiled at start-up
(one graph each), then no recompilation in live steps of mixed batch sizes, and the same latents as eager
(inductor on this CPU; CUDA graphs on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden_data import model_folders, relative_l2, small_model

from avatar_forcing.model.engine import EngineSettings, StreamingEngine

pytestmark = pytest.mark.slow
BUCKETS = (1, 2, 4)
LATE = 1e6


def open_sessions(engine: StreamingEngine, seeds: list[int]) -> None:
    size = engine.model.config.motion.input_size
    for seed in seeds:
        crop = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
        engine.open_session(crop, seed=seed, session_id=f"s{seed}", now=0.0)


def run_mixed(engine: StreamingEngine) -> dict[str, torch.Tensor]:
    """Sessions join over time so steps run 1, 2, 3 (padded to 4) and 4 rows (as many as the engine holds),
    priming and streaming."""
    blocks: dict[str, list[torch.Tensor]] = {}
    joins = {0: [1], 1: [2], 2: list(range(3, engine.pool.capacity + 1))}
    for step in range(5):
        open_sessions(engine, joins.get(step, []))
        for out in engine.step(now=LATE):
            blocks.setdefault(out.session_id, []).append(out.latents)
    for sid in list(engine.sessions):
        engine.close_session(sid)
    return {sid: torch.cat(x) for sid, x in blocks.items()}


@pytest.mark.parametrize("folder", model_folders())
@pytest.mark.parametrize("precision", ["bfloat16"])  # the GPU default, and the pool dtype precompile once got wrong
# "step": one graph per bucket and phase (the transformer call: every solver step and the clean pass share it);
# "loop": plus the whole denoising loop as one graph (every step, the guidance and the Euler updates); its
# compile is slow (the steps are unrolled), so it runs with fewer buckets.
@pytest.mark.parametrize("scope,buckets,graphs_per_bucket_and_phase", [("step", BUCKETS, 1), ("loop", (1, 2), 2)])
def test_precompiled_steps_never_recompile_and_match_eager(folder, precision, scope, buckets,
                                                           graphs_per_bucket_and_phase):
    from torch._dynamo.utils import counters

    model = small_model(folder)
    settings = dict(max_sessions=max(buckets), decode=False, batch_buckets=buckets, precision=precision)
    eager = run_mixed(StreamingEngine(model, EngineSettings(**settings)))

    torch._dynamo.reset()
    counters.clear()
    engine = StreamingEngine(model, EngineSettings(**settings, compile=True, compile_scope=scope))
    engine.precompile()
    compiled_at_start = counters["stats"]["unique_graphs"]
    # A graph break (Python the compiler cannot trace, e.g. a branch on a tensor) would add graphs.
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert compiled_at_start == graphs_per_bucket_and_phase * 2 * len(buckets), dict(counters["stats"])
    counters["recompiles"].clear()
    compiled = run_mixed(engine)
    assert sum(counters["recompiles"].values()) == 0, f"recompiled in live steps: {dict(counters['recompiles'])}"
    assert counters["stats"]["unique_graphs"] == compiled_at_start, "live steps compiled new graphs"
    bound = 1e-5 if precision == "float32" else 2e-2
    for sid in eager:
        assert relative_l2(compiled[sid], eager[sid]) < bound, sid
