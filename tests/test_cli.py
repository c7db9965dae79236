"""The first minutes at the command line: a fast `--help` and `--version`, and early one-line failures that
say what is wrong and what to do (no model to serve, no network for a download, a portrait without a face)
before anything slow runs. Each runs the real `avatar-forcing` command in a subprocess with a fresh HOME and
no network to the hub (HF_ENDPOINT points at a closed local port, so the check is the same everywhere)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from golden_data import MEDIA_DIR

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def run(args: list[str], home: Path, timeout: float = 60, **env_extra) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AVATAR_FORCING_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"),
               HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", **env_extra)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "avatar_forcing.cli", *args], env=env, cwd=home,
                          capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - t0


def test_help_is_fast_and_speaks_to_users(tmp_path):
    done, took = run(["--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "avatar-forcing serve" in done.stdout and "serve" in done.stdout and "generate" in done.stdout
    # Only the command being run is imported: no torch for --help (it took 8 s when everything was).
    assert took < 3, f"--help took {took:.1f} s"
    probe = subprocess.run([sys.executable, "-c", "import sys; from avatar_forcing import cli; "
                            "cli.build_parser(''); print('torch' in sys.modules, 'aiortc' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["False", "False"]


def test_version(tmp_path):
    from avatar_forcing import __version__

    done, _ = run(["--version"], tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"avatar-forcing {__version__}"


def test_every_command_registers(tmp_path):
    """Each command's own parser loads when that command is named (a broken registration line fails)."""
    from avatar_forcing.cli import COMMANDS, build_parser

    for name in COMMANDS:
        parser = build_parser(name)
        with pytest.raises(SystemExit) as info:
            parser.parse_args([name, "--help"])
        assert info.value.code == 0, name


def test_serve_from_an_unreachable_hub_says_what_to_do_within_seconds(tmp_path):
    """The official weights asked for (`--weights hub`) on a machine with no network: two lines, at once, no
    retries, no server started. (With nothing configured the built-in model serves: test_builtin.py.)"""
    done, took = run(["serve", "--weights", "hub", "--port", str(closed_port())], tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    error = [line for line in lines if "error:" in line or line.startswith("  ")]
    assert error[0].startswith("avatar-forcing serve: error: no model to serve: the official weights are not in")
    assert "hub cannot be reached" in error[0]
    assert "avatar-forcing weights download" in error[1] and "non-commercial" in error[1] and "GPU" in error[1]
    assert len(error) == 2, lines
    assert "Uvicorn running" not in done.stderr and "ready: serving" not in done.stderr
    assert took < 10, f"took {took:.1f} s"


def test_serve_offline_mode_is_one_line_too(tmp_path):
    done, took = run(["serve", "--weights", "hub"], tmp_path, HF_HUB_OFFLINE="1")
    assert done.returncode == 2 and "offline mode is on (HF_HUB_OFFLINE)" in done.stderr, done.stderr
    assert took < 10


def test_weights_download_without_network_fails_fast_and_leaves_nothing(tmp_path):
    target = tmp_path / "weights"
    done, took = run(["weights", "download", "--dir", str(target)], tmp_path)
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "cannot be reached" in message and "multimodalart/AvatarForcingHelpers" in message
    # Where to go instead: a machine that reaches the hub, then copy the folder here.
    assert "where the Hugging Face hub is reachable" in message and "--weights DIR" in message
    assert took < 10, f"took {took:.1f} s"
    assert not target.exists() and not (tmp_path / ".cache" / "huggingface").exists()


@pytest.mark.skipif(not (MEDIA_DIR / "user.mp4").exists(), reason=f"needs the sample media in {MEDIA_DIR}")
def test_generate_checks_inputs_before_the_model(tmp_path):
    """No face, or no output folder: one line, before any weights are looked for (there are none here)."""
    import cv2

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((256, 256, 3), 128, np.uint8))
    common = ["--avatar-audio", str(MEDIA_DIR / "user.mp4"), "--user-video", str(MEDIA_DIR / "user.mp4")]
    done, _ = run(["generate", "--avatar-image", str(blank), *common, "-o", str(tmp_path / "out.mp4")], tmp_path)
    assert done.returncode == 2 and "face" in done.stderr.lower(), done.stderr
    assert "weights" not in done.stderr and "model loaded" not in done.stderr

    portrait = MEDIA_DIR / "rumi.jpg"
    done, _ = run(["generate", "--avatar-image", str(portrait), *common, "-o", str(tmp_path / "nope" / "out.mp4")],
                  tmp_path)
    assert done.returncode == 2 and "output folder" in done.stderr and "does not exist" in done.stderr

    # Inputs fine, the official weights asked for and not there: the weights check answers in one line, still
    # before any loading (with nothing asked for, the built-in model would serve).
    done, took = run(["generate", "--avatar-image", str(portrait), *common, "--weights", "hub",
                      "-o", str(tmp_path / "out.mp4")], tmp_path)
    assert done.returncode == 2 and "hub cannot be reached" in done.stderr, done.stderr
    assert "model loaded" not in done.stderr and took < 20


def test_log_format_follows_the_terminal():
    """auto: text when a person watches stderr, JSON lines for files and collectors."""
    code = ("import logging, sys; from avatar_forcing.server.logs import setup_logging; setup_logging('auto'); "
            "logging.getLogger('huggingface_hub').warning('hub says hi')")
    import pty

    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = piped.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("{") and '"hub says hi"' in lines[0], lines  # JSON, once

    out = bytearray()

    def read(fd: int) -> bytes:
        data = os.read(fd, 1024)
        out.extend(data)
        return data

    pty.spawn([sys.executable, "-c", code], read)
    text = out.decode().strip().splitlines()
    assert len(text) == 1 and not text[0].startswith("{") and text[0].endswith("hub says hi"), text


def test_push_speech_unknown_session_is_one_line(tmp_path):
    """examples/push_speech.py against a server that is not there / a file that is not a WAV: no traceback."""
    wav = tmp_path / "bad.wav"
    wav.write_bytes(b"not a wav")
    script = REPO / "examples" / "push_speech.py"
    done = subprocess.run([sys.executable, str(script), "http://127.0.0.1:1", "s_x", str(wav)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.startswith("push_speech: error:"), done.stderr
    assert "Traceback" not in done.stderr
    good = tmp_path / "good.wav"
    with wave.open(str(good), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(1600, "<i2").tobytes())
    done = subprocess.run([sys.executable, str(script), "localhost:8080", "s_x", str(good)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "must start with http://" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, str(script), "http://127.0.0.1:1", "s_x", str(good)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "cannot reach http://127.0.0.1:1" in done.stderr, done.stderr
