"""The 2D face rig (model/training/rig.py): each control moves what it names, as the face mesh measures it on
the rendered frames, on a public-domain portrait that ships in a package (matplotlib's Grace Hopper sample)
and on the sample portrait (rumi.jpg, tests only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from golden_data import MEDIA_DIR

from avatar_forcing.model.media.face_mesh import FaceMesh, normalised
from avatar_forcing.model.media.image import load_image
from avatar_forcing.model.training.landmarks import face_parameters, mouth_opening, smile
from avatar_forcing.model.training.rig import LOWER_LIP, MOUTH_CORNERS, UPPER_LIP, Expression, FaceRig

LIPS = LOWER_LIP + UPPER_LIP + MOUTH_CORNERS


def grace_hopper() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


PORTRAITS = [pytest.param(grace_hopper, id="grace_hopper"),
             pytest.param(lambda: MEDIA_DIR / "rumi.jpg", id="rumi",
                          marks=pytest.mark.skipif(not (MEDIA_DIR / "rumi.jpg").exists(), reason="no sample media"))]


def eye_opening(points: np.ndarray) -> float:
    """Upper to lower lid (vertically) over the interocular distance, both eyes."""
    iod = np.linalg.norm(points[33, :2] - points[263, :2])
    return float((abs(points[145, 1] - points[159, 1]) + abs(points[374, 1] - points[386, 1])) / 2 / iod)


@pytest.fixture(scope="module", params=PORTRAITS)
def rigged(request):
    image = load_image(request.param())
    mesh = FaceMesh()
    rig = FaceRig(image, mesh=mesh)

    def measure(e: Expression) -> np.ndarray:
        mesh.reset()
        points = mesh(rig.render(e))
        assert points is not None, f"no face found in the render of {e}"
        return points

    return image, rig, measure


def test_the_neutral_expression_renders_the_portrait(rigged):
    image, rig, _ = rigged
    frame = rig.render(Expression())
    assert frame.shape == image.shape and frame.dtype == np.uint8
    assert np.abs(frame.astype(int) - image).mean() < 0.2


def test_jaw_smile_and_rounding_move_the_mouth(rigged):
    _, _, measure = rigged
    neutral = measure(Expression())
    openings = [mouth_opening(measure(Expression(jaw=j))) for j in (0.0, 0.3, 0.6)]
    assert openings[0] < 0.05 and openings[1] > openings[0] + 0.05 and openings[2] > openings[1], openings
    assert smile(measure(Expression(smile=1.0))) > 1.08 * smile(neutral)
    assert smile(measure(Expression(rounding=1.0))) < 0.97 * smile(neutral)


def test_a_smile_parts_the_lips_a_little(rigged):
    """The teeth show in a smile (what makes it learnable by the motion encoder), but it opens the mouth far less
    than speech does."""
    _, _, measure = rigged
    closed = mouth_opening(measure(Expression()))
    smiling = mouth_opening(measure(Expression(smile=1.0)))
    speaking = mouth_opening(measure(Expression(jaw=0.6)))
    assert closed + 0.03 < smiling < speaking, (closed, smiling, speaking)



def test_a_blink_closes_the_eyes_and_changes_nothing_else(rigged):
    """The mesh's eyelid points barely follow a blink (MediaPipe refines eyes with a separate iris model), so the
    rig's own landmarks are checked, and the rendered pixels: the eyes change, the mouth does not."""
    image, rig, _ = rigged
    assert eye_opening(rig.landmarks(Expression(blink=1.0))) < 0.15 * eye_opening(rig.landmarks(Expression()))
    frame = rig.render(Expression(blink=1.0)).astype(int)

    def change(indices: list[int]) -> float:
        (x0, y0), (x1, y1) = rig.base[indices, :2].min(0).astype(int), rig.base[indices, :2].max(0).astype(int) + 1
        return float(np.abs(frame[y0:y1, x0:x1] - image[y0:y1, x0:x1]).mean())

    eyes, mouth = change([33, 133, 159, 145]) + change([263, 362, 386, 374]), change([61, 291, 0, 17])
    assert eyes > 8 and mouth < 1, (eyes, mouth)


def test_head_rotations_read_as_yaw_pitch_and_roll(rigged):
    _, _, measure = rigged
    reference = normalised(measure(Expression()))

    def pose(e: Expression) -> np.ndarray:
        return face_parameters(measure(e)[None], reference).pose[0]  # yaw, pitch, roll in degrees

    left, right = pose(Expression(yaw=-15))[0], pose(Expression(yaw=15))[0]
    assert left < -6 and right > 6, (left, right)
    assert 6 < abs(pose(Expression(pitch=10))[1]) < 14
    assert 7 < abs(pose(Expression(roll=10))[2]) < 13
    assert np.sign(pose(Expression(roll=10))[2]) == -np.sign(pose(Expression(roll=-10))[2])


def test_rig_pairs_render_the_expression_they_report():
    """Auto-encoder pairs from the rig: reproducible per (seed, step, key) and split-independent, uint8 CHW
    frames of the look's size, and a driving code that is the expression the frame was rendered with (an
    open-jaw code comes with an open mouth on the frame)."""
    from avatar_forcing.model.media.face import crop_portrait
    from avatar_forcing.model.training.conversations import augmented
    from avatar_forcing.model.training.rig_pairs import CODE_FIELDS, RigPairs

    face = crop_portrait(load_image(grace_hopper()), 128)
    pairs = RigPairs([FaceRig(augmented(face, 1000)), FaceRig(augmented(face, 1001))], seed=3)
    whole = pairs.batch(5, 6, 0, 6)
    assert whole.source.shape == whole.driving.shape == (6, 3, 128, 128) and str(whole.source.dtype) == "torch.uint8"
    assert whole.driving_code.shape == (6, len(CODE_FIELDS))
    part = pairs.batch(5, 6, 2, 3)
    assert np.array_equal(part.driving.numpy(), whole.driving[2:5].numpy())
    assert np.array_equal(part.driving_code.numpy(), whole.driving_code[2:5].numpy())
    assert not np.array_equal(pairs.batch(6, 6, 0, 6).driving.numpy(), whole.driving.numpy())
    # Each pair's mouth region: where the lips are on either frame, as the face mesh finds them.
    assert whole.mouth.shape == (6, 1, 128, 128) and set(whole.mouth.unique().tolist()) <= {0, 1}
    assert np.array_equal(part.mouth.numpy(), whole.mouth[2:5].numpy())
    # The code is the rendering's: jaw opening measured on the frames follows the jaw code.
    mesh = FaceMesh()
    batch = pairs.batch(0, 16, 0, 16)
    jaw = batch.driving_code[:, CODE_FIELDS.index("jaw")].numpy()
    opening = []
    for frame in batch.driving.permute(0, 2, 3, 1).numpy():
        mesh.reset()
        opening.append(float(mouth_opening(mesh(np.ascontiguousarray(frame)))))
    assert np.corrcoef(jaw, opening)[0, 1] > 0.7, list(zip(jaw.round(2), np.round(opening, 3), strict=True))
    for frame, region in zip(batch.driving.permute(0, 2, 3, 1).numpy(), batch.mouth[:, 0].numpy(), strict=True):
        mesh.reset()
        lips = mesh(np.ascontiguousarray(frame))[LIPS, :2].round().astype(int)
        assert region[lips[:, 1], lips[:, 0]].all()
        assert 0.01 < region.mean() < 0.25  # the mouth and cheeks, not the face


def test_mouth_region_follows_the_mouth():
    """The box around the lips widens with a smile, drops with an open jaw, and moves with the head."""
    rig = FaceRig(load_image(grace_hopper()))

    def box(e: Expression) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(rig.mouth_region(e))
        return xs.min(), ys.min(), xs.max(), ys.max()

    still = box(Expression())
    smiling, open_jaw, turned = box(Expression(smile=1.0)), box(Expression(jaw=1.0)), box(Expression(yaw=15))
    assert smiling[2] - smiling[0] > still[2] - still[0] + 0.1 * rig.iod
    assert open_jaw[3] > still[3] + 0.2 * rig.iod
    assert turned[0] != still[0] and turned[2] != still[2]
    assert not rig.mouth_region(Expression())[:, : still[0]].any()
