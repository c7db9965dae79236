"""`avatar-forcing loadtest`: real WebRTC clients against a running server.

For each session count N: N clients send a media file as webcam + microphone (or, without --media, only
receive, which leaves more of a shared machine's CPU to the server) and receive the avatar; over a
measurement window it reports the frame rate each client receives, the share of fresh frames (not repeats
of a late block), late blocks, and the server's event-loop lag. Then it opens and closes sessions many
times and reports the server's memory, threads and tasks after the first cycle and after the last.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx

from .client import ApiError, AvatarClient


def metric(text: str, name: str, labels: str = "") -> float | None:
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def encode_ms(before: str, after: str) -> float | None:
    """Mean compression time of a video frame between two scrapes, wherever it ran (codec thread or media
    process), in milliseconds."""
    total = count = 0.0
    for where in ("thread", "process"):
        labels = f'where="{where}"'
        s0, s1 = (metric(t, "avatar_video_encode_seconds_sum", labels) for t in (before, after))
        n0, n1 = (metric(t, "avatar_video_encode_seconds_count", labels) for t in (before, after))
        if None not in (s0, s1, n0, n1):
            total += s1 - s0  # type: ignore[operator]
            count += n1 - n0  # type: ignore[operator]
    return 1000 * total / count if count else None


def cpu_seconds(before: str, after: str) -> float:
    """CPU the server's own process used between two scrapes (its media processes not included)."""
    return (metric(after, "process_cpu_seconds_total") or 0) - (metric(before, "process_cpu_seconds_total") or 0)


async def measure(url: str, token: str | None, avatar: str, media: Path | None, n: int, seconds: float) -> dict:
    clients = [AvatarClient(url, token) for _ in range(n)]
    try:
        for i, c in enumerate(clients):
            try:
                await c.start(avatar, media=media)
            except ApiError as exc:
                return {"n": n, "refused": f"session {i + 1} refused: {exc.status} {exc.error.get('code')}"}
        try:
            async with asyncio.timeout(30):
                await asyncio.gather(*(c.first_video() for c in clients))
        except TimeoutError:
            raise RuntimeError("sessions did not start streaming within 30 s") from None
        await asyncio.sleep(3.0)  # past the lead-in
        async with httpx.AsyncClient(timeout=10) as http:
            text_before = (await http.get(url + "/metrics")).text
        scraped_at = time.monotonic()
        before = [(await c.info())["stats"] for c in clients]
        await asyncio.sleep(seconds)
        after = [(await c.info())["stats"] for c in clients]
        fps = [c.received.fps(seconds) for c in clients]
        async with httpx.AsyncClient(timeout=10) as http:
            text = (await http.get(url + "/metrics")).text
        between = time.monotonic() - scraped_at
        fresh = []
        late = 0
        for b, a in zip(before, after, strict=True):
            sent = a["video_frames_sent"] - b["video_frames_sent"]
            repeated = a["video_frames_repeated"] - b["video_frames_repeated"]
            fresh.append(sent / max(1, sent + repeated))
            late += a["late_blocks"] - b["late_blocks"]
        return {"n": n, "fps": fps, "fresh": fresh, "late_blocks": late,
                "busy": metric(text, "avatar_worker_utilisation"),
                "lag_p50": metric(text, "avatar_event_loop_lag_window_seconds", 'stat="p50"'),
                "lag_p99": metric(text, "avatar_event_loop_lag_window_seconds", 'stat="p99"'),
                "delay": [a["playout_delay_seconds"] for a in after],
                "encode_ms": encode_ms(text_before, text), "cpu": cpu_seconds(text_before, text) / between}
    finally:
        for c in clients:
            await c.stop()
            await c.close()


async def open_when_admitted(url: str, token: str | None, avatar: str) -> AvatarClient:
    """A receive-only session, waiting as long as the server answers 503 (busy, loading)."""
    while True:
        c = AvatarClient(url, token)
        try:
            await c.start(avatar)
            return c
        except ApiError as exc:
            await c.close()
            if exc.status != 503:
                raise
            await asyncio.sleep(2)


async def cycles(url: str, token: str | None, avatar: str, count: int) -> dict:
    marks = {}
    for i in range(1, count + 1):
        c = await open_when_admitted(url, token, avatar)
        try:
            async with asyncio.timeout(30):
                await c.first_video()
        except TimeoutError:
            await c.stop()
            await c.close()
            raise RuntimeError(f"session {i} did not start streaming within 30 s") from None
        await c.stop()
        await c.close()
        if i in (1, count):
            await asyncio.sleep(1.2)  # gauges refresh every second
            async with httpx.AsyncClient(timeout=10) as http:
                text = (await http.get(url + "/metrics")).text
            marks[i] = {"rss_mb": (metric(text, "process_resident_memory_bytes") or 0) / 2**20,
                        "threads": metric(text, "avatar_threads"), "tasks": metric(text, "avatar_event_loop_tasks"),
                        "sessions": metric(text, "avatar_sessions_active")}
    return marks


async def run(args) -> int:
    url = args.url.rstrip("/")
    async with AvatarClient(url, args.token) as c:
        avatar = await c.upload_avatar(await asyncio.to_thread(Path(args.portrait).read_bytes))
    print(f"load test of {url}: clients {'send ' + args.media if args.media else 'only receive'}, "
          f"{args.seconds:.0f} s windows")
    print(f"{'N':>3} {'fps per session (received)':<34}{'fresh frames':>14}{'late blocks':>12}"
          f"{'loop lag p50':>14}{'p99':>8}{'delay s':>9}{'worker busy':>13}{'encode ms':>11}{'server cores':>14}")
    held = 0
    for n in [int(x) for x in args.sessions]:
        r = await measure(url, args.token, avatar, Path(args.media) if args.media else None, n, args.seconds)
        if "refused" in r:
            print(f"{n:>3} {r['refused']}")
            break
        ok = min(r["fps"]) >= 24 and min(r["fresh"]) >= 0.95
        held = n if ok and n > held else held
        print(f"{n:>3} {' '.join(f'{f:.1f}' for f in r['fps']):<34}{min(r['fresh']):>13.0%} {r['late_blocks']:>11}"
              f"{1000 * r['lag_p50']:>12.1f}ms{1000 * r['lag_p99']:>6.1f}ms{max(r['delay']):>9.2f}"
              f"{r['busy']:>12.0%}{'n/a' if r['encode_ms'] is None else format(r['encode_ms'], '.2f'):>11}"
              f"{r['cpu']:>14.2f}")
        await asyncio.sleep(6)  # let the worker's utilisation window forget this round
    print(f"sessions held at full frame rate (>= 24 fps received, >= 95% of them fresh): {held}")
    if args.cycles:
        marks = await cycles(url, args.token, avatar, args.cycles)
        for i, m in marks.items():
            print(f"after {i:>4} open/close cycles: RSS {m['rss_mb']:.1f} MB, {m['threads']:.0f} threads, "
                  f"{m['tasks']:.0f} tasks, {m['sessions']:.0f} sessions open")
    return 0


def add_loadtest_command(subparsers) -> None:
    p = subparsers.add_parser("loadtest", help="WebRTC load test of a running server", description=__doc__)
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.2:8080")
    p.add_argument("--token", help="bearer token, when the server wants one")
    p.add_argument("--portrait", required=True, help="portrait image to upload")
    p.add_argument("--media", help="video file with audio, played as each client's webcam + mic (default: clients "
                                   "only receive)")
    p.add_argument("--sessions", nargs="+", default=[1, 2, 3, 4], help="session counts to try")
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window per count")
    p.add_argument("--cycles", type=int, default=100, help="open/close cycles for the memory check (0: skip)")
    p.set_defaults(func=run_loadtest)


def run_loadtest(args) -> int:
    try:
        return asyncio.run(run(args))
    except (httpx.HTTPError, ApiError, RuntimeError) as exc:
        if isinstance(exc, ApiError):
            detail = f"{exc.status} {exc.error.get('message')}"
        else:
            detail = str(exc) or type(exc).__name__
        print(f"avatar-forcing loadtest: {args.url}: {detail}", file=sys.stderr)
        return 1
