"""Stream a WAV file into a live session as the avatar's speech, the way a TTS engine would.

    python examples/push_speech.py http://localhost:8080 SESSION_ID hello.wav [--token TOKEN]

The session id is shown on the page under Start (with a Copy button) once a conversation is live. The
script sends PCM16 mono chunks of 100 ms over the session's speech WebSocket at the file's own sample
rate, then prints one line: how much speech it queued and when the avatar will have finished saying it
(the server's own figures; --verbose prints every answer). --interrupt stops the avatar talking instead.
"""

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import websockets

from avatar_forcing.errors import MediaError
from avatar_forcing.model.media.audio import read_wav_bytes


class Refused(Exception):
    """The server or the input said no: printed as one line."""


def speech_url(server: str, session_id: str, rate: int, token: str | None) -> str:
    if not server.startswith(("http://", "https://")):
        raise Refused(f"server {server!r} must start with http:// or https:// (e.g. http://localhost:8080)")
    url = f"{server.rstrip('/').replace('http', 'ws', 1)}/v1/sessions/{session_id}/speech?sample_rate={rate}"
    return url + (f"&token={token}" if token else "")


def server_error(exc: Exception) -> str:
    """The server's own message from a refused WebSocket handshake (404 unknown session, 401...)."""
    response = getattr(exc, "response", None)
    if response is not None:
        try:
            error = json.loads(bytes(response.body or b""))["error"]
            return f"{error['message']} ({error['code']}, HTTP {response.status_code})"
        except (ValueError, KeyError, TypeError):
            return f"HTTP {response.status_code}"
    return str(exc)


def read_speech(path: str) -> tuple[np.ndarray, int]:
    try:
        return read_wav_bytes(Path(path).read_bytes())  # float32 mono, any WAV flavour
    except OSError as exc:
        raise Refused(f"cannot read {path}: {exc.strerror}") from None
    except MediaError as exc:
        raise Refused(str(exc)) from None


async def push(args: argparse.Namespace) -> None:
    pcm, rate = read_speech(args.wav)  # small files: reading before the connection opens is fine
    url = speech_url(args.server, args.session_id, rate, args.token)
    chunk = rate // 10
    try:
        ws = await websockets.connect(url)
    except websockets.InvalidStatus as exc:
        raise Refused(f"the server refused the speech stream: {server_error(exc)}. Check the session id "
                      "(shown on the page under Start) and that the conversation is still live.") from None
    except OSError as exc:
        raise Refused(f"cannot reach {args.server}: {exc.strerror or exc}") from None
    async with ws:
        json.loads(await ws.recv())  # {"type": "ready", ...}
        if args.interrupt:
            await ws.send(json.dumps({"type": "interrupt"}))
            answer = json.loads(await ws.recv())
            print(f"interrupted: dropped {answer.get('dropped_seconds', 0):.2f} s of queued speech")
            return
        last: dict = {}
        for i in range(0, len(pcm), chunk):
            await ws.send((np.clip(pcm[i:i + chunk], -1, 1) * 32767).astype("<i2").tobytes())
            last = json.loads(await ws.recv())
            if args.verbose:
                print(json.dumps(last))
            if last.get("type") == "error":
                error = last.get("error", {})
                raise Refused(f"the server stopped the stream: {error.get('message')} ({error.get('code')})")
    # The server answers each chunk with when that chunk starts playing: the last one's start plus its
    # length is when the avatar finishes speaking (a voice agent's "finished speaking" moment).
    last_chunk_s = (len(pcm) - (len(pcm) - 1) // chunk * chunk) / rate if len(pcm) else 0.0
    finish = last.get("starts_in_seconds", 0.0) + last_chunk_s
    print(f"queued {len(pcm) / rate:.2f} s of speech ({last.get('queued_seconds', 0.0):.2f} s waiting now); "
          f"the avatar finishes saying it in about {finish:.2f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server", help="the server's address, e.g. http://localhost:8080")
    p.add_argument("session_id", help="the session id the page shows under Start")
    p.add_argument("wav", help="a WAV file (any sample rate, mono or stereo)")
    p.add_argument("--token", help="the server's access token, when it asks for one")
    p.add_argument("--interrupt", action="store_true", help="barge in: drop the queued speech, then quit")
    p.add_argument("-v", "--verbose", action="store_true", help="print every answer of the server")
    args = p.parse_args()
    try:
        asyncio.run(push(args))
    except Refused as exc:
        print(f"push_speech: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
