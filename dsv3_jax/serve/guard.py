"""What stands in front of the routes (one ASGI middleware): API keys, a body limit, request ids.

    Guard(app, api_key="sk-...", open_paths=("/health", "/metrics"), max_body=32 * 2**20)

* API key: with one set, every path but `open_paths` needs `Authorization: Bearer KEY` (else 401 in OpenAI's
  error body); the comparison takes the same time whatever the key sent.
* Body limit: a request body past `max_body` bytes gets 413, by its Content-Length before anything is read,
  or (chunked, no length) as soon as the bytes read pass the limit; nothing larger is ever buffered.
* Request ids: the response carries `X-Request-Id`: the client's own, or a fresh one.
"""
from __future__ import annotations

import hmac
import json
import uuid


class Guard:
    def __init__(self, app, *, api_key: str | None = None, open_paths=("/health", "/metrics"),
                 max_body: int = 32 * 2**20):
        self.app, self.api_key, self.open_paths, self.max_body = app, api_key, tuple(open_paths), max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        rid = headers.get("x-request-id") or uuid.uuid4().hex

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        if self.api_key and scope["path"] not in self.open_paths:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await _refuse(send_with_id, 401, "a valid API key is required: send the header "
                                                        "'Authorization: Bearer KEY'", "authentication_error")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _refuse(send_with_id, 413, f"the request body has {int(length)} bytes; this server takes "
                                                    f"at most {self.max_body}", "invalid_request_error")
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):  # chunked: read it, to the limit
            chunks, seen, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunks.append(message.get("body", b""))
                seen += len(chunks[-1])
                more = message.get("more_body", False)
                if seen > self.max_body:
                    return await _refuse(send_with_id, 413, f"the request body passed {self.max_body} bytes, the "
                                                            f"most this server takes", "invalid_request_error")
            body, replayed = b"".join(chunks), False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await self.app(scope, replay, send_with_id)
        return await self.app(scope, receive, send_with_id)


async def _refuse(send, status: int, message: str, kind: str):
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
