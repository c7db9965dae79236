"""Does a model talk and listen? Measured on its own frames with the face mesh, on a conversation made here
(conversations.py): the avatar side's speech drives the model, the user side is rendered with the rig and fed
as the user's video and audio, and the output is compared with what happened in the conversation. A recorded
exchange (real speech, a real user's video) is measured the same way (`recorded_conversation`), without smiles.

- lip sync: mouth opening against the avatar's speech envelope, best correlation within +-5 frames, its lag;
- listening: head-motion energy while only the user speaks over that in mutual silence;
- smile back: the share of the user's smile onsets after which the avatar's smile measure rises within 1 s;
- smile response (`smile_response`): the same conversation generated again with the user's smiles taken out
  of their video (same speech, same sampling noise); per onset, how much wider the avatar's mouth is in the
  second after it with the smiling user than with the still one. Its own speech and smiles cancel out;
- identity: SSIM of the central face region of a frame against the portrait (first frames, and later ones).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..avatar_forcing import AvatarForcing
from ..engine import PrecomputedInputs
from ..media.face_mesh import FaceMesh, hold_last_face, normalised
from ..offline import PreparedJob, audio_features, generate_blocks, motion_latents
from .autoencoder import ssim
from .conversations import EXPRESSION_FIELDS, FPS, Conversation, Side, envelope, render, voice_activity
from .landmarks import face_parameters, head_motion_energy, mouth_opening, smile
from .metrics import lip_sync
from .rig import FaceRig

SMILE_RISE = 0.01  # mouth width over eye distance that counts as smiling back (a full rig smile adds about 0.2)


def generate_for(model: AvatarForcing, conversation: Conversation, avatar_portrait: np.ndarray,
                 user_portrait: np.ndarray, seed: int = 20) -> np.ndarray:
    """The model's frames [N, S, S, 3] of the avatar side of `conversation` (portraits: S x S face crops)."""
    cfg = model.config
    frames = conversation.frames
    user = render(FaceRig(user_portrait), conversation.expressions("user"))
    inputs = PrecomputedInputs(audio_features(model, conversation.avatar.pcm, frames),
                               audio_features(model, conversation.user.pcm, frames),
                               motion_latents(model, user, frames),
                               avatar_pcm=conversation.avatar.pcm, samples_per_frame=cfg.audio.samples_per_frame)
    return generated_frames(model, PreparedJob(avatar_portrait, inputs), seed)


def generated_frames(model: AvatarForcing, prepared: PreparedJob, seed: int) -> np.ndarray:
    """The engine's frames [prepared.num_frames, S, S, 3] of a prepared clip (rendered or recorded)."""
    blocks = [b.frames for b in generate_blocks(model, prepared, seed=seed)]
    return np.concatenate([b for b in blocks if b is not None])[:prepared.num_frames]


def recorded_conversation(avatar_pcm: np.ndarray, user_pcm: np.ndarray, frames: int) -> Conversation:
    """A recorded exchange (each side's speech, 16 kHz) as a conversation `measure` reads: each side speaks
    where its voice is active, found as the rendered conversations find it. Nobody's expressions are known, so
    it has no smile onsets."""
    still = np.zeros((frames, len(EXPRESSION_FIELDS)))
    return Conversation(*(Side(pcm, voice_activity(envelope(pcm, frames))[1], still)
                          for pcm in (avatar_pcm, user_pcm)))


def face_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of the central 3/4 of two uint8 crops (the face region of a portrait crop)."""
    s = a.shape[0]
    box = slice(s // 8, s - s // 8)
    as_tensor = lambda x: torch.from_numpy(np.ascontiguousarray(x[box, box])).permute(2, 0, 1)[None].float() / 255
    return float(ssim(as_tensor(a), as_tensor(b)))

@dataclass
class Behaviour:
    faces_found: float  # share of frames where the face mesh found a face
    lip_sync: float  # best correlation
    lip_lag: int  # frames, positive: the mouth follows the audio
    listening: float  # head-motion energy while only the user speaks
    quiet: float  # ... and in mutual silence
    smile_backs: list[bool]  # per user smile onset: did the avatar's smile rise within 1 s
    identity_first: float  # SSIM of the first frame against the portrait
    identity_last: float  # SSIM of the last frame against the portrait

    @property
    def listening_ratio(self) -> float:
        return self.listening / max(self.quiet, 1e-12)

    def line(self) -> str:
        rate = f"{np.mean(self.smile_backs):.0%} of {len(self.smile_backs)}" if self.smile_backs else "no onsets"
        return (f"lip sync r={self.lip_sync:.2f} at lag {self.lip_lag}; listening {self.listening_ratio:.2f}x "
                f"({self.listening:.4f} / {self.quiet:.4f}); smile back {rate}; identity SSIM first "
                f"{self.identity_first:.3f}, last {self.identity_last:.3f}; faces found {self.faces_found:.0%}")


def measure(conversation: Conversation, portrait: np.ndarray, frames: np.ndarray,
            mesh: FaceMesh | None = None) -> Behaviour:
    mesh = mesh or FaceMesh()
    mesh.reset()
    seen = [mesh(frame) for frame in frames]
    found = np.array([p is not None for p in seen])
    if not found.any():
        raise ValueError("the face mesh found no face in any generated frame")
    points = hold_last_face(seen)
    r, lag = lip_sync(mouth_opening(points), envelope(conversation.avatar.pcm, conversation.frames))
    reference = normalised(points[0])
    pose = np.array([face_parameters(p[None], reference).pose[0] for p in points])
    avatar, user = conversation.avatar.speaking, conversation.user.speaking
    listening = head_motion_energy(pose, user & ~avatar)
    quiet = head_motion_energy(pose, ~user & ~avatar)
    onsets = smile_onsets(conversation, len(frames))
    width = smile(points)
    backs = [bool(width[o + FPS // 4:o + FPS].mean() > width[o - FPS // 2:o].mean() + SMILE_RISE) for o in onsets]
    return Behaviour(float(found.mean()), r, lag, listening, quiet, backs, face_ssim(frames[0], portrait),
                     face_ssim(frames[-1], portrait))


def smile_onsets(conversation: Conversation, frames: int) -> np.ndarray:
    """Frames where the user's smile crosses 0.3 upwards, with half a second before and a second after."""
    user_smile = conversation.user.expression[:, EXPRESSION_FIELDS.index("smile")]
    onsets = np.flatnonzero((user_smile[1:] >= 0.3) & (user_smile[:-1] < 0.3)) + 1
    return onsets[(onsets > FPS // 2) & (onsets < frames - FPS)]


def with_user_smile(conversation: Conversation, smile_track: np.ndarray | float) -> Conversation:
    """The same conversation with the user's smile track replaced ([T] or one value; their speech and other
    motion unchanged)."""
    expression = conversation.user.expression.copy()
    expression[:, EXPRESSION_FIELDS.index("smile")] = smile_track
    return dataclasses.replace(conversation, user=dataclasses.replace(conversation.user, expression=expression))


def smile_response(model: AvatarForcing, conversation: Conversation, avatar_portrait: np.ndarray,
                   user_portrait: np.ndarray, seed: int = 20, frames: np.ndarray | None = None,
                   mesh: FaceMesh | None = None) -> np.ndarray:
    """Per user smile onset: the avatar's mouth width (over eye distance) in the second after it, generated
    with the user's smiles minus generated without them ([onsets]; > 0: it smiled back). `frames`: the
    conversation's own generation with this seed where the caller has it already (it is not made again)."""
    mesh = mesh or FaceMesh()
    if frames is None:
        frames = generate_for(model, conversation, avatar_portrait, user_portrait, seed)
    widths = []
    for generated in (frames, generate_for(model, with_user_smile(conversation, 0.0), avatar_portrait,
                                           user_portrait, seed)):
        mesh.reset()
        widths.append(smile(hold_last_face([mesh(f) for f in generated])))
    onsets = smile_onsets(conversation, len(widths[0]))
    return np.array([widths[0][o:o + FPS].mean() - widths[1][o:o + FPS].mean() for o in onsets])

