"""DDP: `torchrun --nproc_per_node 2` on CPU (gloo) makes the same update as one process with the doubled
batch, and as one process with two accumulated micro-batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_training import FOLDER, quick, synthetic, tiny_config, tiny_model  # noqa: E402

from avatar_forcing.model.training.loop import Distributed  # noqa: E402
from avatar_forcing.model.training.transformer import transformer_trainer  # noqa: E402

pytestmark = pytest.mark.skipif(FOLDER is None, reason="needs a golden folder for the small configuration")
STEPS = 2


def train(out: Path, micro_batch: int, accumulation: int = 1) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    dist_info = Distributed.from_environment(torch.device("cpu"))
    clips = synthetic(tiny_config(), count=4, frames=60)
    trainer = transformer_trainer(tiny_model(), clips, quick(STEPS, micro_batch=micro_batch, accumulation=accumulation),
                                  out, dist_info=dist_info)
    trainer.run()
    return {k: v.clone() for k, v in trainer.module.state_dict().items()}


def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__)), str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    single = train(tmp_path / "single", micro_batch=4)
    accumulated = train(tmp_path / "accumulated", micro_batch=2, accumulation=2)
    # Key biases get no true gradient (softmax ignores them); Adam scales their float noise up to ~1e-5,
    # so the tolerance is 1% of one learning-rate step. A wrong split or missing averaging moves every
    # weight by a whole step.
    tol = 0.01 * quick(STEPS).lr
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=tol, msg=name)
        torch.testing.assert_close(accumulated[name], value, rtol=0, atol=tol, msg=name)
    start = tiny_model().flow_transformer.final_layer.linear.weight
    assert not torch.allclose(single["flow_transformer.final_layer.linear.weight"], start)  # the steps did train


if __name__ == "__main__":  # one torchrun worker
    out = Path(sys.argv[1])
    state = train(out, micro_batch=2)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(state, out / "rank0.pt")
    torch.distributed.destroy_process_group()
