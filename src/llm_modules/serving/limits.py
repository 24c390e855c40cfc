"""Request body size limit, as ASGI middleware: a body above the limit gets a 413 in OpenAI's error shape before
any of it is parsed.

Written here because uvicorn has no body limit and FastAPI's ``max_body_size`` (recent releases only) answers
with a plain-text 413, which OpenAI clients cannot read as an error. The body is read (at most ``max_bytes``)
before the app sees it, so the app never holds more than that per request.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import APIError

DRAIN_FACTOR = 64  # a body up to DRAIN_FACTOR x the limit is read and dropped, so that the client reads the 413


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= DRAIN_FACTOR * self.max_bytes:
                await self._drain(receive)
            return await self._reject(scope, send, int(declared))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._drain(receive)
                return await self._reject(scope, send, size)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client to disconnect

        return await self.app(scope, replay, send)

    async def _drain(self, receive: Receive) -> None:
        read = 0
        while read <= DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _reject(self, scope: Scope, send: Send, size: int) -> None:
        error = APIError(413, f"the request body has {size} bytes or more; this server takes at most {self.max_bytes} "
                              "(llm-modules serve --max-body-bytes)", code="request_too_large")
        await error.response()(scope, _disconnected, send)


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}
