"""A voice agent you can talk to in the browser, with the avatar as its face: all local, no API keys.

    python examples/voice_agent.py --server http://localhost:8080 --portrait face.jpg
    # then open http://localhost:7860/ , press Start, allow camera and microphone, speak, pause.

Pipecat pipeline: the browser's microphone and camera over Pipecat's SmallWebRTC transport → Silero VAD (its
model ships in the pipecat-ai wheel) → canned replies → espeak-ng TTS → the avatar server (which also gets the
user's microphone and camera, so the avatar listens) → the avatar's video and voice back to the browser.

There is no offline speech recognition here, so the agent does not understand words: each user turn (speech,
then half a second of quiet) gets the next of a few fixed replies. Speaking while the avatar talks
interrupts it. `--llm` puts speech recognition and an LLM in their place (`llm_brain` below).
Needs `pip install "avatar-forcing-server[pipecat]"` and the Debian package espeak-ng.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import httpx
import uvicorn

from avatar_forcing.integrations.local_agent import create_app


def llm_brain(avatar):
    """A real LLM instead of the canned replies: `--llm` with OPENAI_API_KEY set (`pip install
    "pipecat-ai[openai]"`). The turn then needs words, so speech recognition comes with it. Any Pipecat STT
    and LLM service fits here. Not run on the development machine (no network there)."""
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
    from pipecat.services.openai.llm import OpenAILLMService
    from pipecat.services.openai.stt import OpenAISTTService

    key = os.environ["OPENAI_API_KEY"]
    context = LLMContext([{"role": "system", "content": "You are a friendly talking head. Answer in one short "
                                                        "sentence, in plain words (it is spoken aloud)."}])
    user, _assistant = LLMContextAggregatorPair(context)
    return [OpenAISTTService(api_key=key), user,
            OpenAILLMService(api_key=key, settings=OpenAILLMService.Settings(model="gpt-4o-mini"))]


def resolve_avatar(server: str, portrait: Path | None, token: str | None) -> str:
    """The avatar id: the portrait uploaded once, or the newest avatar the server already has."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=60) as http:
        if portrait is not None:
            reply = http.post("/v1/avatars", content=portrait.read_bytes(),
                              headers={"content-type": "application/octet-stream"})
            if reply.status_code >= 400:
                sys.exit(f"the server refused the portrait: {reply.status_code} {reply.text[:300]}")
            return reply.json()["avatar_id"]
        avatars = http.get("/v1/avatars").json().get("avatars", [])
        if not avatars:
            sys.exit("the server has no avatar yet: give one with --portrait face.jpg")
        return avatars[-1]["avatar_id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://localhost:8080", help="the avatar server")
    parser.add_argument("--portrait", type=Path, help="the avatar's face (default: the server's newest avatar)")
    parser.add_argument("--token", default=os.environ.get("AVATAR_FORCING_TOKEN"), help="the server's API token")
    parser.add_argument("--host", default="localhost", help="where this page listens")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--size", type=int, default=512, help="the avatar video's width and height sent to the browser")
    parser.add_argument("--llm", action="store_true", help="OpenAI speech recognition + LLM, not canned replies")
    args = parser.parse_args()
    avatar_id = resolve_avatar(args.server, args.portrait, args.token)
    app = create_app(server_url=args.server, avatar_id=avatar_id, token=args.token,
                     video_size=(args.size, args.size), brain=llm_brain if args.llm else None)
    print(f"avatar {avatar_id} on {args.server}: open http://{args.host}:{args.port}/ and press Start", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
