"""One JSON error shape for every failure: {"error": {"status", "code", "message"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from avatar_forcing.errors import MediaError, UserError

log = logging.getLogger("avatar_forcing.server")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return ApiError(status, code, message, headers).response()


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    def count(status: int) -> None:
        if on_error is not None:
            on_error(status)

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError):
        count(exc.status)
        return exc.response()

    @app.exception_handler(MediaError)
    async def _media(_: Request, exc: MediaError):
        count(400)
        return error_response(400, "bad_media", str(exc))

    @app.exception_handler(UserError)
    async def _user(_: Request, exc: UserError):
        count(400)
        return error_response(400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        count(422)
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(422, "invalid_request", f"the request does not match the API: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        count(exc.status_code)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect):
        # The client hung up mid-body: nobody reads an answer, and it is not a server error (499, nginx's
        # "client closed request", so the error counter still shows it).
        count(499)
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        count(500)
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error; the server log has the details")
