"""Which model serves when nothing is configured: the official one when its files are cached, else the built-in
one (said in one line), and anything configured is left alone; for `avatar-forcing serve` and `generate`.
A stand-in built-in folder holding the golden small model's weights (the built-in model's sizes) makes this
independent of whether this checkout carries the trained weights; tests/test_builtin.py checks those."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from golden_data import golden_folders
from safetensors.torch import load_file, save_file

from avatar_forcing.errors import UserError
from avatar_forcing.model.avatar_forcing import build_model
from avatar_forcing.model.config import config_from_name
from avatar_forcing.server.cli import check_model
from avatar_forcing.server.config import ServerSettings
from avatar_forcing.weights import builtin, hub
from avatar_forcing.weights.loading import load_model

GOLDEN = next((f for f in golden_folders() if (f / "small_weights.safetensors").exists()), None)
pytestmark = pytest.mark.skipif(GOLDEN is None, reason="needs the golden small configuration and weights")


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    folder = tmp_path / "builtin"
    folder.mkdir()
    # The golden small model has the built-in model's sizes; our extensions' tensors (zero) are added.
    tensors = load_file(GOLDEN / "small_weights.safetensors")
    expected = build_model(config_from_name("builtin")).state_dict()
    tensors |= {name: torch.zeros_like(expected[name]) for name in expected.keys() - tensors.keys()
                if "user_to_avatar" in name or ".canonical." in name or ".user_expression." in name}
    save_file(tensors, folder / builtin.WEIGHTS_NAME)
    monkeypatch.setattr(builtin, "folder", lambda: folder)
    monkeypatch.setattr(hub, "missing_from_cache", lambda cache_dir=None: list(hub.CHECKPOINTS))
    monkeypatch.delenv(hub.WEIGHTS_ENV, raising=False)
    return folder


def test_nothing_configured_serves_the_builtin_model_and_says_so_once(stand_in, caplog):
    settings = ServerSettings()
    with caplog.at_level(logging.WARNING, logger="avatar_forcing.server"):
        what = check_model(settings)
    assert (settings.config, settings.weights) == (builtin.NAME, builtin.NAME)
    assert what.startswith("the built-in model")
    said = [r.getMessage() for r in caplog.records if "no official weights" in r.getMessage()]
    assert len(said) == 1 and "non-commercial" in said[0] and "Official weights" in said[0], said
    model = load_model(config_from_name(settings.config), settings.weights)
    assert model.config.motion.input_size == config_from_name(builtin.NAME).motion.input_size


def test_cached_official_weights_are_preferred(stand_in, monkeypatch):
    monkeypatch.setattr(hub, "missing_from_cache", lambda cache_dir=None: [])
    settings = ServerSettings()
    assert check_model(settings).startswith("the official model")
    assert settings.config == "official" and settings.weights is None


def test_anything_configured_is_left_alone(stand_in, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = ServerSettings(weights="hub")
    with pytest.raises(UserError, match="no model to serve"):
        check_model(asked)  # the official weights were asked for: no silent switch to another model
    small = ServerSettings(config=str(GOLDEN), weights=str(GOLDEN / "small_weights.safetensors"))
    assert "random weights" in check_model(small) and small.config == str(GOLDEN)


def test_no_builtin_weights_in_this_install_means_the_old_advice(stand_in, monkeypatch):
    (stand_in / builtin.WEIGHTS_NAME).unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="no model to serve"):
        check_model(ServerSettings())


def test_generate_chooses_the_same_way(stand_in):
    from avatar_forcing.generate import use_builtin_unless_configured

    args = argparse.Namespace(config="official", weights=None)
    assert use_builtin_unless_configured(args)  # the caller says so once the inputs are checked
    assert (args.config, args.weights) == (builtin.NAME, builtin.NAME)
    chosen = argparse.Namespace(config="official", weights="some/folder")
    assert not use_builtin_unless_configured(chosen)
    assert (chosen.config, chosen.weights) == ("official", "some/folder")
