"""The listening metrics against values worked out by hand on small arrays, and their edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avatar_forcing.model.training.metrics import (
    assign,
    entropy,
    frechet_distance,
    kmeans,
    lip_sync,
    pcc,
    rpcc,
    score_group,
    sid,
    speech_envelope,
    table,
    variance,
)


def test_pcc_by_hand_and_constant_series():
    a = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    b = np.array([[2.0, 1.0], [4.0, 2.0], [6.0, 3.0]])
    assert pcc(a, b).tolist() == [pytest.approx(1.0), 0.0]  # constant column: 0, not NaN
    assert pcc(a[:, 0], -a[:, 0]).tolist() == [pytest.approx(-1.0)]
    # x = [1, 2, 3, 4], y = [1, 3, 2, 4]: cov 1.0, var 1.25 each -> 0.8
    assert pcc(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4]))[0] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="NaN"):
        pcc(np.array([1.0, np.nan]), np.array([1.0, 2.0]))


def test_rpcc_by_hand():
    user = [np.array([1.0, 2, 3, 4])]
    truth = [np.array([1.0, 3, 2, 4])]  # PCC with the user 0.8
    gen = [np.array([4.0, 3, 2, 1])]  # PCC -1
    assert rpcc(user, gen, truth) == pytest.approx(1.8)
    assert rpcc(user, truth, truth) == 0.0
    still = [np.zeros(4)]
    assert rpcc(user, still, truth) == pytest.approx(0.8)  # a still avatar: PCC 0, finite
    with pytest.raises(ValueError, match="same"):
        rpcc(user, gen, truth + truth)


def test_variance_by_hand():
    # columns [0, 2] (var 1) and [1, 1] (var 0): mean 0.5; second sequence var 4 -> mean over sequences 2.25
    assert variance([np.array([[0.0, 1], [2, 1]]), np.array([[0.0], [4.0]])]) == pytest.approx(2.25)


def test_kmeans_entropy_and_sid():
    truth = [np.array([[0.0], [0.1], [10.0], [10.1]])]
    centers = kmeans(truth[0], 2)
    assert sorted(centers.ravel().round(2).tolist()) == [0.05, 10.05]
    assert entropy(np.array([0, 0, 1, 1]), 2) == pytest.approx(math.log(2))
    assert sid([np.array([[0.0], [10.0]])], truth, 2) == pytest.approx(math.log(2))
    assert sid([np.array([[0.0], [0.2]])], truth, 2) == 0.0  # all in one cluster
    # One distinct ground-truth point: one cluster whatever k, entropy 0, no NaN.
    assert sid([np.array([[3.0], [4.0]])], [np.ones((5, 1))], 15) == 0.0
    assert assign(np.array([[9.0]]), centers).tolist() == [int(np.argmax(centers.ravel()))]


def test_frechet_distance_by_hand():
    a = [np.array([[-1.0], [1.0]])]  # mean 0, var 1
    b = [np.array([[1.0], [5.0]])]  # mean 3, var 4
    # (0 - 3)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 9 + 5 - 4
    assert frechet_distance(b, a) == pytest.approx(10.0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((200, 3))]
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance([x[0] + 1.0], x) == pytest.approx(3.0, abs=1e-9)  # a pure shift of 1 in 3 dims


def test_lip_sync_finds_the_lag_and_stays_finite_on_silence():
    rng = np.random.default_rng(0)
    envelope = np.abs(rng.standard_normal(100))
    mouth = np.concatenate([np.zeros(2), envelope[:-2]])  # the mouth follows the audio 2 frames late
    r, lag = lip_sync(mouth, envelope)
    assert lag == 2 and r == pytest.approx(1.0, abs=1e-9)
    assert lip_sync(mouth, np.zeros(100)) == (0.0, 0)
    with pytest.raises(ValueError, match="too short"):
        lip_sync(np.zeros(5), np.zeros(5))


def test_speech_envelope_is_rms_per_frame():
    pcm = np.concatenate([np.full(640, 0.5), np.zeros(640), np.full(100, 1.0)])
    assert speech_envelope(pcm, 640).tolist() == [pytest.approx(0.5), 0.0]


def test_table_lists_every_group_and_metric():
    s = score_group([np.arange(20.0)[:, None]], [np.arange(20.0)[:, None] % 3], [np.arange(20.0)[:, None]], 3)
    text = table({"model": {"exp": s, "pose": s}})
    assert text.splitlines()[0].split(" | ")[1:] == ["rPCC-exp", "rPCC-pose", "SID-exp", "SID-pose", "Var-exp",
                                                    "Var-pose", "FD-exp", "FD-pose"]
    assert f"{s.rpcc:.3f}" in text.splitlines()[2]
