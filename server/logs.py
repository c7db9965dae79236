"""Logs with the session id of the code that logged it: one JSON object per line for collectors, or plain
text for a person at a terminal (`auto`, the default, picks by whether stderr is a terminal)."""

from __future__ import annotations

import contextvars
import importlib
import json
import logging
import re
import sys
import time

session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)


class _SessionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "session_id", None):
            record.session_id = session_id_var.get()
        return True


_SECRET_PARAM = re.compile(r"([?&](?:token|access_token)=)[^&\s\"']*", re.IGNORECASE)


class _RedactFilter(logging.Filter):
    """Secrets passed in URLs (`?token=` on the speech WebSocket, the documented browser way) never reach
    the log: uvicorn writes the request target of every WebSocket and access line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRET_PARAM.sub(r"\1[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        session_id = getattr(record, "session_id", None)
        if session_id:
            entry["session_id"] = session_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def resolve_format(fmt: str) -> str:
    """`auto` -> text when stderr is a terminal (someone is reading), JSON otherwise (a file, a pipe, a
    container runtime's collector)."""
    if fmt != "auto":
        return fmt
    return "text" if sys.stderr.isatty() else "json"


class _StartupNoise(logging.Filter):
    """Drops uvicorn's start-up announcements (they would claim a server that cannot serve yet)."""

    PREFIXES = ("Uvicorn running on", "Started server process", "Waiting for application startup",
                "Application startup complete")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not record.getMessage().startswith(self.PREFIXES)


def setup_logging(fmt: str = "auto", level: str = "info") -> None:
    fmt = resolve_format(fmt)
    handler = logging.StreamHandler()
    handler.addFilter(_SessionFilter())
    handler.addFilter(_RedactFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(session_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aioice", "aiortc", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # huggingface_hub and transformers bring their own stderr handler: with ours, each of their lines
    # came out twice (plain and JSON). They go through ours alone.
    for library in ("huggingface_hub", "transformers"):
        try:  # their handler appears when their logging module is first imported: import it now
            importlib.import_module(f"{library}.utils.logging")
        except ImportError:
            pass
        logger = logging.getLogger(library)
        logger.handlers[:] = []
        logger.propagate = True
    # uvicorn's start-up lines ("Uvicorn running on ...") come before the model has loaded; our own "ready:
    # serving ..." line says when the server is really usable. Its other lines (WebSocket connections,
    # warnings, a port in use) still show.
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_error.filters[:] = [f for f in uvicorn_error.filters if not isinstance(f, _StartupNoise)]
    uvicorn_error.addFilter(_StartupNoise())
