"""`avatar-forcing eval`: the latent-basis extractor, the Table-4 evaluation on the synthetic set (truth scores
perfect, a user-blind copy scores worse on rPCC), the lip-sync proxy, and the command on a latents file."""

from __future__ import annotations

import numpy as np
import pytest
from golden_data import MEDIA_DIR
from safetensors.torch import save_file
from synthetic_dyadic import GROUPS, LIP, coordinates, make_clips
from test_training import FOLDER

from avatar_forcing.cli import main
from avatar_forcing.model.training.data import save_shards
from avatar_forcing.model.training.evaluate import BasisExtractor, evaluate, parse_groups, plot_per_dimension


def synthetic_extractor(spec, mouth=None):
    return BasisExtractor(spec.basis / spec.scale, groups=GROUPS, mouth=mouth)


def test_parse_groups_and_bad_indices():
    assert parse_groups("exp=0-2,pose=3") == {"exp": [0, 1, 2], "pose": [3]}
    with pytest.raises(ValueError, match="NAME=FIRST-LAST"):
        parse_groups("exp")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        BasisExtractor(np.eye(2, 4), {"exp": [0, 5]})


def test_extractor_reads_the_synthetic_coordinates():
    clips, spec = make_clips(1, 60, 16, 8, seed=0)
    c = clips[0]
    params = synthetic_extractor(spec)(c.motion, c.r_s)
    np.testing.assert_allclose(np.concatenate([params["exp"], params["pose"]], 1),
                               coordinates(c.motion, c.r_s, spec), atol=1e-5)


def test_truth_is_perfect_and_a_user_blind_copy_is_not():
    clips, spec = make_clips(6, 120, 16, 8, seed=0)
    ex = synthetic_extractor(spec, mouth=LIP)
    truth = evaluate(clips, [c.motion for c in clips], ex)
    for group in GROUPS:
        assert truth.scores[group].rpcc == pytest.approx(0.0, abs=1e-12)
        assert truth.scores[group].fd == pytest.approx(0.0, abs=1e-6)
    # Each clip's motion given to the next clip: same style and variance, but reacting to another user.
    shifted = [clips[(i + 1) % len(clips)].motion - clips[(i + 1) % len(clips)].r_s + c.r_s
               for i, c in enumerate(clips)]
    blind = evaluate(clips, shifted, ex)
    assert blind.scores["pose"].rpcc > 0.1 and blind.scores["exp"].rpcc > 0.1
    assert blind.per_dimension["exp"]["rpcc"].shape == (2,)
    # Lip-sync proxy: the synthetic lip coordinate follows the avatar's envelope (here written as PCM).
    spf = 640
    pcm = [np.repeat(np.abs(coordinates(c.motion, c.r_s, spec)[:, LIP]), spf) * np.tile([1.0, -1.0], 60 * spf)
           for c in clips]
    sync_truth = evaluate(clips, [c.motion for c in clips], ex, avatar_pcm=pcm, samples_per_frame=spf).lip_sync
    sync_blind = evaluate(clips, shifted, ex, avatar_pcm=pcm, samples_per_frame=spf).lip_sync
    assert sync_truth[0] > 0.9 and sync_truth[1] == 0
    assert sync_blind[0] < sync_truth[0]
    with pytest.raises(ValueError, match="shorter"):
        evaluate(clips[:1], [clips[0].motion[:50]], ex)


def test_per_dimension_plots_are_written(tmp_path):
    """The `train` extra (and the test extra) install matplotlib: the plot is a real image, one row of panels
    per group, and two models draw different bars."""
    import cv2

    clips, spec = make_clips(2, 60, 16, 8, seed=0)
    ex = synthetic_extractor(spec)
    truth = evaluate(clips, [c.motion for c in clips], ex)
    still = evaluate(clips, [c.motion * 0.1 for c in clips], ex)
    out = plot_per_dimension({"truth": truth, "damped": still}, tmp_path / "p.png")
    assert out == tmp_path / "p.png"
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] >= 300 * len(truth.per_dimension) and image.shape[1] >= 900
    assert image.std() > 10, "an empty canvas"


@pytest.mark.skipif(FOLDER is None, reason="needs a golden folder for the small configuration")
def test_eval_command_on_a_latents_file(tmp_path, capsys):
    from avatar_forcing.model.config import from_golden_dir

    cfg = from_golden_dir(FOLDER)
    clips, _ = make_clips(3, 60, cfg.transformer.dim_w, cfg.audio.projection_in_features(), seed=0)
    save_shards(clips, tmp_path / "shards")
    save_file({c.name: c.motion.flip(0).contiguous() for c in clips}, str(tmp_path / "reversed.safetensors"))
    code = main(["eval", "--data", str(tmp_path / "shards"), "--generated", str(tmp_path / "reversed.safetensors"),
                 "--weights", str(FOLDER / "small_weights.safetensors"), "--config", str(FOLDER), "--device", "cpu",
                 "--groups", "exp=0-9,pose=10-19", "--out", str(tmp_path / "eval")])
    assert code == 0
    text = (tmp_path / "eval" / "table.md").read_text()
    assert "rPCC-exp" in text and "reversed" in text and "ground truth" in text
    assert "reversed" in capsys.readouterr().out
    assert main(["eval", "--data", str(tmp_path / "shards"), "--generated", str(tmp_path / "nope.safetensors"),
                 "--weights", str(FOLDER / "small_weights.safetensors"), "--config", str(FOLDER),
                 "--device", "cpu"]) == 2


@pytest.mark.skipif(not (MEDIA_DIR / "official_output.mp4").exists(), reason=f"needs the sample media in {MEDIA_DIR}")
def test_eval_command_on_videos_with_face_landmarks(tmp_path):
    """`eval --videos`: the official output as the true avatar beside user.mp4; generated rows are the same
    video (it must score as the truth: rPCC 0, the same lip sync) and a frozen copy of its first frame
    (no motion: Var 0, no lip sync). Clips are cut to 6 s to keep this quick."""
    import json

    from avatar_forcing.model.media.audio import load_audio
    from avatar_forcing.model.media.video import Mp4Writer, read_video_frames

    seconds, fps = 6, 25
    clips, same, frozen = tmp_path / "clips", tmp_path / "same", tmp_path / "frozen"
    for folder in (clips, same, frozen):
        folder.mkdir()
    truth = read_video_frames(MEDIA_DIR / "official_output.mp4", fps)[: seconds * fps]
    user = read_video_frames(MEDIA_DIR / "user.mp4", fps)[: seconds * fps]
    speech = load_audio(MEDIA_DIR / "avatar.wav", 16000)[: seconds * 16000]
    still = truth[:1].repeat(len(truth), 0)
    for path, frames, audio in ((clips / "a.truth.mp4", truth, speech), (clips / "a.user.mp4", user, None),
                                (same / "a.mp4", truth, None), (frozen / "a.mp4", still, None)):
        with Mp4Writer(path, fps, frames.shape[2], frames.shape[1], audio_rate=16000 if audio is not None else None,
                       crf=12) as w:
            w.write_frames(frames)
            if audio is not None:
                w.write_audio(audio)
    code = main(["eval", "--videos", str(clips), "--generated", str(same), str(frozen), "--out", str(tmp_path / "ev")])
    assert code == 0
    result = json.loads((tmp_path / "ev" / "scores.json").read_text())
    scores, sync = result["scores"], result["lip_sync"]
    assert set(scores) == {"same", "frozen", "ground truth"}
    assert scores["same"]["exp"]["rpcc"] < 0.02 and scores["same"]["pose"]["rpcc"] < 0.02
    assert scores["frozen"]["pose"]["var"] < 0.01 * scores["ground truth"]["pose"]["var"]
    assert sync["same"][0] > 0.4 and abs(sync["same"][0] - sync["ground truth"][0]) < 0.05
    assert sync["frozen"][0] < 0.1
    assert (tmp_path / "ev" / "per_dimension.png").stat().st_size > 10_000
    # A clip without its user video is named.
    (clips / "a.user.mp4").unlink()
    assert main(["eval", "--videos", str(clips), "--generated", str(same)]) == 2
