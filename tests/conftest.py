"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from golden_data import MEDIA_DIR
from media_files import write_scaled_copy


@pytest.fixture(scope="session")
def user_video_128px(tmp_path_factory) -> Path:
    """user.mp4 (../shared/media, tests only) at 128 px with its sound, made once per run: the camera of tests
    that run peers in the test process beside a server, where encoding 512 px on 2 cores starves the server."""
    if not (MEDIA_DIR / "user.mp4").exists():
        pytest.skip(f"needs {MEDIA_DIR / 'user.mp4'}")
    path = tmp_path_factory.mktemp("media") / "user_128px.mp4"
    write_scaled_copy(MEDIA_DIR / "user.mp4", path, 128)
    return path


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """A test that sets torch's thread count in the test process (test_training_ddp runs its one-process
    baseline on 1 thread) sets it for every test after it: the Table-4 DPO test took 312 s instead of 129."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
