"""The built-in model's done-when measures on held-out conversations (voices and portrait looks the training
never used), printed one line per conversation and summarised; with --long-minutes, identity drift of one
long session (SSIM of the face region at its last minute against its first).

    .venv/bin/python benchmarks/builtin_behaviour.py --seeds 1 2 3 4 --seconds 30
    .venv/bin/python benchmarks/builtin_behaviour.py --seeds 1 --long-minutes 10
    .venv/bin/python benchmarks/builtin_behaviour.py --smile-response   # smiles against a counterfactual
    .venv/bin/python benchmarks/builtin_behaviour.py --portrait some_face.jpg     # an uploaded portrait
    .venv/bin/python benchmarks/builtin_behaviour.py --user-portrait other.jpg    # a user of another face
    .venv/bin/python benchmarks/builtin_behaviour.py --sample-media ../shared/media --seeds 0 1 2  # real speech

Options --config / --weights measure another model the same way (default: the built-in one).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from avatar_forcing.model.config import config_from_name
from avatar_forcing.model.media.face import crop_portrait
from avatar_forcing.model.media.image import load_image
from avatar_forcing.model.training.behaviour import (
    SMILE_RISE,
    face_ssim,
    generate_for,
    generated_frames,
    measure,
    recorded_conversation,
    smile_response,
)
from avatar_forcing.model.training.conversations import augmented, make_conversation, packaged_portraits
from avatar_forcing.weights.loading import load_model

HELD_OUT_VOICES = (("en-gb-x-gbclan", "en-029"), ("en-029", "en-gb-x-gbcwmd"), ("en-gb-x-gbcwmd", "en-gb-x-gbclan"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="builtin")
    p.add_argument("--weights", default="builtin")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--portrait", type=Path, default=None, help="the avatar's portrait (default: held-out looks)")
    p.add_argument("--user-portrait", type=Path, default=None,
                   help="the face the user's video is rendered from (default: held-out looks)")
    p.add_argument("--long-minutes", type=float, default=0.0, help="also one session this long: identity drift")
    p.add_argument("--smile-response", action="store_true",
                   help="also generate each conversation without the user's smiles: how much wider the mouth is with")
    p.add_argument("--save-frames", type=Path, default=None, help="write the first conversation's frames (.npy)")
    p.add_argument("--sample-media", type=Path, default=None,
                   help="instead: the sample media's recorded exchange (rumi.jpg, avatar.wav, user.mp4), one "
                        "generation per seed, against official_output.mp4 measured the same way")
    args = p.parse_args()
    torch.set_num_threads(2)
    model = load_model(config_from_name(args.config), args.weights)
    if args.sample_media:
        measure_sample_media(model, args.sample_media, args.seeds)
        return
    size = model.config.motion.input_size
    grace = crop_portrait(load_image(packaged_portraits()["grace_hopper"]), size)
    uploaded = crop_portrait(load_image(args.portrait), size) if args.portrait else None
    user_face = crop_portrait(load_image(args.user_portrait), size) if args.user_portrait else None
    results, responses = [], []
    for seed in args.seeds:
        avatar = uploaded if uploaded is not None else augmented(grace, 400_000 + seed)
        user = user_face if user_face is not None else augmented(grace, 500_000 + seed)
        conversation = make_conversation(args.seconds, seed=90_000 + seed,
                                         voices=HELD_OUT_VOICES[seed % len(HELD_OUT_VOICES)])
        t0 = time.perf_counter()
        frames = generate_for(model, conversation, avatar, user)
        took = time.perf_counter() - t0
        if args.save_frames and not results:
            np.save(args.save_frames, frames)
        behaviour = measure(conversation, avatar, frames)
        results.append(behaviour)
        answered = ""
        if args.smile_response:
            wider = smile_response(model, conversation, avatar, user, frames=frames)
            responses.extend(wider > SMILE_RISE)
            answered = f"; smile response {np.round(wider, 3).tolist()}"
        print(f"seed {seed}: {behaviour.line()}{answered} ({took:.0f} s for {args.seconds:.0f} s)", flush=True)
    backs = [b for r in results for b in r.smile_backs]
    print(f"summary over {len(results)} conversations of {args.seconds:.0f} s: "
          f"lip sync r median {np.median([r.lip_sync for r in results]):.2f} "
          f"(lags {sorted(r.lip_lag for r in results)}), "
          f"listening ratio median {np.median([r.listening_ratio for r in results]):.2f}x "
          f"(min {min(r.listening_ratio for r in results):.2f}), "
          f"smile back {np.mean(backs) if backs else float('nan'):.0%} of {len(backs)} onsets, "
          f"identity SSIM of first frames min {min(r.identity_first for r in results):.3f}")
    if responses:
        print(f"smile response: mouth wider by > {SMILE_RISE} with the smiling user than without "
              f"after {np.mean(responses):.0%} of {len(responses)} onsets")
    if args.long_minutes > 0:
        seed = args.seeds[0]
        avatar = uploaded if uploaded is not None else augmented(grace, 400_000 + seed)
        conversation = make_conversation(args.long_minutes * 60, seed=91_000 + seed, voices=HELD_OUT_VOICES[0])
        user = user_face if user_face is not None else augmented(grace, 500_000 + seed)
        frames = generate_for(model, conversation, avatar, user)
        minute = 60 * 25
        first = np.mean([face_ssim(f, avatar) for f in frames[:minute:25]])
        last = np.mean([face_ssim(f, avatar) for f in frames[-minute::25]])
        print(f"{args.long_minutes:.0f}-minute session: face-region SSIM to the portrait, minute 1 {first:.3f}, "
              f"last minute {last:.3f} ({last / first:.0%} of minute 1)")


def measure_sample_media(model, folder: Path, seeds: list[int]) -> None:
    """Real speech and a real user: the sample media (test-only) through the offline generator's path, and the
    official model's published output of the same inputs measured the same way (its lip sync is the baseline)."""
    from avatar_forcing.model.media.audio import load_audio
    from avatar_forcing.model.media.video import read_video_frames
    from avatar_forcing.model.offline import OfflineJob, portrait_crop, prepare

    job = OfflineJob(folder / "rumi.jpg", folder / "avatar.wav", folder / "user.mp4")
    rate = model.config.sampling_rate
    prepared = prepare(model, job)
    official = read_video_frames(folder / "official_output.mp4", model.config.fps)
    frames = min(prepared.num_frames, len(official))
    conversation = recorded_conversation(load_audio(job.avatar_audio, rate), load_audio(job.user_video, rate), frames)
    print(f"the exchange: {frames} frames; the avatar speaks in {conversation.avatar.speaking.mean():.0%} of them, "
          f"the user alone in {(conversation.user.speaking & ~conversation.avatar.speaking).mean():.0%}, neither in "
          f"{(~conversation.user.speaking & ~conversation.avatar.speaking).mean():.0%}")
    baseline = measure(conversation, portrait_crop(job.avatar_image, official.shape[1], True), official[:frames])
    print(f"official model's published output: {baseline.line()}", flush=True)
    ratios = []
    for seed in seeds:
        behaviour = measure(conversation, prepared.portrait, generated_frames(model, prepared, seed)[:frames])
        ratios.append(behaviour.lip_sync / baseline.lip_sync)
        print(f"seed {seed}: {behaviour.line()}; lip sync {ratios[-1]:.2f}x the official output's", flush=True)
    print(f"lip sync over {len(seeds)} seeds: {np.min(ratios):.2f}-{np.max(ratios):.2f}x the official output's "
          f"{baseline.lip_sync:.2f}")


if __name__ == "__main__":
    main()
