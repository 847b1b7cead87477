"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for load generation.

The load generator shares the machine with the service, so it must cost as little CPU as
possible: requests are pre-encoded bytes and a response is read by Content-Length only
(tens of microseconds per request, several times cheaper than a general-purpose client).
It speaks only what the service answers: no chunked bodies, no redirects, no TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json


class HttpError(Exception):
    pass


def encode_post(host: str, path: str, body: object, headers: dict[str, str] | None = None) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def encode_get(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


class Connection:
    """One persistent connection; ``request`` sends raw bytes and returns (status, headers, body)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        if self._writer is None or self._writer.is_closing():
            await self._connect()
        assert self._reader is not None and self._writer is not None
        self._writer.write(raw)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].split(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {status_line!r}")
        headers: dict[bytes, bytes] = {}
        for line in header_lines:
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip()
        length = headers.get(b"content-length")
        if length is None:
            raise HttpError("response without Content-Length")
        body = await self._reader.readexactly(int(length))
        if headers.get(b"connection", b"").lower() == b"close":
            await self.close()
        return int(parts[1]), headers, body

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
            self._writer = None
