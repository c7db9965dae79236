"""Stream a WAV file into a live session as the avatar's speech, the way a TTS engine would.

    python examples/push_speech.py http://localhost:8080 SESSION_ID hello.wav [--token TOKEN]

It sends PCM16 mono chunks of 100 ms over the session's speech WebSocket at the file's own sample rate and
prints what the server says (how much speech is queued). Ctrl-C, or --interrupt, stops the avatar talking.
"""

import argparse
import asyncio
import json

import numpy as np
import websockets

from avatar_forcing.model.media.audio import read_wav_bytes


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server")
    p.add_argument("session_id")
    p.add_argument("wav")
    p.add_argument("--token")
    p.add_argument("--interrupt", action="store_true", help="barge in: drop the queued speech, then quit")
    args = p.parse_args()

    pcm, rate = read_wav_bytes(open(args.wav, "rb").read())  # float32 mono, any WAV flavour
    url = f"{args.server.replace('http', 'ws', 1)}/v1/sessions/{args.session_id}/speech?sample_rate={rate}"
    if args.token:
        url += f"&token={args.token}"
    async with websockets.connect(url) as ws:
        print(await ws.recv())  # {"type": "ready", ...}
        if args.interrupt:
            await ws.send(json.dumps({"type": "interrupt"}))
            print(await ws.recv())
            return
        chunk = rate // 10
        for i in range(0, len(pcm), chunk):
            await ws.send((np.clip(pcm[i:i + chunk], -1, 1) * 32767).astype("<i2").tobytes())
            print(await ws.recv())  # {"type": "queued", "queued_seconds": ..., "starts_in_seconds": ...}


if __name__ == "__main__":
    asyncio.run(main())
