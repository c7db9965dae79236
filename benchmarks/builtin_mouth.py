"""Where the built-in model's mouth loses its width: the same held-out conversations (as builtin_behaviour.py
makes them) through each stage, the mouth opening measured with the face mesh on every frame.

- rig: the rig's own rendering of the avatar side (what the training data shows);
- round trip: those frames encoded and decoded again by the auto-encoder, animating the portrait as served;
- jaw from the rig / jaw doubled: the same, with the encoder's jaw magnitude replaced by the rig's jaw in the
  encoder's own units, or doubled (can the decoder open the mouth wider than the encoder asks?);
- generated: the model's output for the conversation (the transformer and the sampler on top).

The encoder's jaw magnitude is also regressed on the rig's jaw value: its slope and correlation say how well the
encoder reads the jaw.

    .venv/bin/python benchmarks/builtin_mouth.py --seeds 1 2 7
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from builtin_behaviour import HELD_OUT_VOICES

from avatar_forcing.model.config import config_from_name
from avatar_forcing.model.media.face import crop_portrait
from avatar_forcing.model.media.face_mesh import FaceMesh, hold_last_face
from avatar_forcing.model.media.image import load_image, to_model_input, to_uint8
from avatar_forcing.model.training.behaviour import generate_for
from avatar_forcing.model.training.conversations import augmented, make_conversation, packaged_portraits, render
from avatar_forcing.model.training.landmarks import mouth_opening
from avatar_forcing.model.training.rig import FaceRig
from avatar_forcing.model.training.rig_pairs import CODE_FIELDS
from avatar_forcing.weights.loading import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="builtin")
    p.add_argument("--weights", default="builtin")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    torch.set_num_threads(2)
    model = load_model(config_from_name(args.config), args.weights)
    mae = model.motion_autoencoder
    size = model.config.motion.input_size
    grace = crop_portrait(load_image(packaged_portraits()["grace_hopper"]), size)
    mesh = FaceMesh()
    jaw_field = CODE_FIELDS.index("jaw")

    def opening(frames: np.ndarray) -> np.ndarray:
        mesh.reset()
        return mouth_opening(hold_last_face([mesh(f) for f in frames]))

    for seed in args.seeds:
        avatar = augmented(grace, 400_000 + seed)
        user = augmented(grace, 500_000 + seed)
        conversation = make_conversation(args.seconds, seed=90_000 + seed,
                                         voices=HELD_OUT_VOICES[seed % len(HELD_OUT_VOICES)])
        expressions = conversation.expressions("avatar")
        rig = render(FaceRig(avatar), expressions)
        jaw = np.array([e.jaw for e in expressions])
        with torch.inference_mode():
            codes = torch.cat([mae.enc.net_app(to_model_input(np.stack(rig[i:i + 50])))[0]
                               for i in range(0, len(rig), 50)])
            magnitudes = mae.enc.fc(codes)
            read = magnitudes[:, jaw_field].numpy()
            slope, offset = np.polyfit(jaw, read, 1)
            from_rig, doubled = magnitudes.clone(), magnitudes.clone()
            from_rig[:, jaw_field] = torch.from_numpy(slope * jaw + offset).float()
            doubled[:, jaw_field] *= 2
            portrait = mae.animation_code(to_model_input(avatar[None]))
            direction = mae.dec.direction
            stages = {"rig": rig,
                      "round trip": to_uint8(mae.decode_frames(portrait, direction(magnitudes))),
                      "jaw from the rig": to_uint8(mae.decode_frames(portrait, direction(from_rig))),
                      "jaw doubled": to_uint8(mae.decode_frames(portrait, direction(doubled)))}
        stages["generated"] = generate_for(model, conversation, avatar, user)
        speaking = conversation.avatar.speaking
        print(f"seed {seed}: the encoder's jaw magnitude = {slope:.2f} x the rig's jaw + {offset:.2f} "
              f"(correlation {np.corrcoef(read, jaw)[0, 1]:.2f})")
        truth = opening(rig)
        for name, frames in stages.items():
            o = opening(frames)
            print(f"  {name:>17}: mouth opening while speaking {o[speaking].mean():.3f} "
                  f"({o[speaking].mean() / truth[speaking].mean():.0%} of the rig's), p90 "
                  f"{np.percentile(o[speaking], 90):.3f}, silent {o[~speaking].mean():.3f}; "
                  f"correlation with the rig's {np.corrcoef(o, truth)[0, 1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
