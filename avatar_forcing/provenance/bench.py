"""Watermark cost and robustness, printed as tables:

    python -m avatar_forcing.provenance.bench [--video ../shared/media/official_output.mp4] [--device cpu]

1. Cost: marking a batch of frames (the engine hook's call) per frame, at 512 and 128 px, on the device.
2. Robustness: the video marked at 512 and at 128 px, rescaled, encoded (VP8 / H.264) at a bitrate,
   decoded: the share of 2-second windows where the detector finds the mark, and of windows whose
   payload decodes with a valid CRC.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .check import check_frames
from .marker import FrameMarker
from .transcode import rescale, transcode


def cost_ms(marker: FrameMarker, size: int, batch: int, frames: int, device: str, repeats: int = 20) -> float:
    x = torch.randint(0, 256, (batch, frames, size, size, 3), dtype=torch.uint8, device=device)
    ids = [f"s{i}" for i in range(batch)]
    marker(ids, x)  # patterns are rendered once per session: not part of the steady cost
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        marker(ids, x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats / (batch * frames) * 1000


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", type=Path, default=Path("../shared/media/official_output.mp4"))
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-robustness", action="store_true")
    args = p.parse_args(argv)
    marker = FrameMarker(4242)
    print(f"cost of marking on {args.device} (ms per frame, amortised over the batch):")
    for size, batch in ((512, 1), (512, 8), (128, 1), (128, 16)):
        print(f"  {size}x{size}, {batch} session(s) x 10 frames: {cost_ms(marker, size, batch, 10, args.device):.3f}")
    if args.skip_robustness:
        return
    from avatar_forcing.model.media.video import read_video_frames

    source = read_video_frames(args.video)[: round(args.seconds * 25)]
    print(f"\nrobustness ({args.video.name}, {len(source)} frames; 2-s windows found / payload valid):")
    print(f"  {'marked at':>9} {'codec':>5} {'kbit/s':>6} {'resize':>6} {'found':>6} {'payload':>7} {'min z':>6}")
    for size in (512, 128):
        host = rescale(source, size / source.shape[1])
        marked = marker(["bench"], torch.from_numpy(host)[None])[0].numpy()
        for codec in ("vp8", "h264"):
            for kbps in ((150, 300, 1000) if size == 512 else (100, 300)):
                for scale in (1.0, 0.5):
                    received = transcode(rescale(marked, scale), codec, kbps * 1000)
                    result = check_frames(iter(received), 25)
                    valid = np.mean([w.present and w.payload_valid for w in result.windows])
                    print(f"  {size:>9} {codec:>5} {kbps:>6} {scale:>6} {result.marked_fraction:>6.0%} {valid:>7.0%} "
                          f"{min(w.z for w in result.windows):>6.1f}", flush=True)


if __name__ == "__main__":
    main()
