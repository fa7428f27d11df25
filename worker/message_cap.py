"""A cap on the size of a broker message that acts before any of it is parsed or even kept in
memory: the Redis client and reply parser that kiln's transport (worker/broker.py) pops with.

kombu pops a message with BRPOP (or RPOP), reads the whole reply, then parses the envelope JSON,
base64-decodes the body and parses that JSON too: a 200 MB inline image costs the worker well
over a GB before kiln sees the message (measured 1.1 GB just for redis-py reading a 356 MB
reply). Here the reply parser reads the length header of each bulk string first; a message over
`max_message_bytes` is drained from the socket in small pieces, never kept, and recorded in
`kiln:dead-letters` with its size and queue.

"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from redis._parsers import _RESP3Parser
from redis._parsers.socket import SocketBuffer
from redis.utils import SENTINEL

from worker.store import DEAD_LETTERS

log = logging.getLogger(__name__)

_DRAIN_PIECE = 1 << 20


class Oversized:
    """Stands for a bulk string that was too long to read: only its length is known."""

    def __init__(self, length: int) -> None:
        self.length = length


def _drain(buffer: SocketBuffer, length: int, timeout: Any) -> None:
    """Consume `length` bytes of the reply in pieces of at most 1 MiB, keeping none of them."""
    while length > 0:
        if buffer.unread_bytes() == 0:
            buffer.purge()  # all that was buffered is consumed: drop it before reading on
            buffer._read_from_socket(min(length, _DRAIN_PIECE), timeout=timeout)
        length -= len(buffer._buffer.read(min(length, _DRAIN_PIECE)))


def capped_parser(max_bytes: int) -> type[_RESP3Parser]:
    """redis-py's parser (RESP3, its default protocol; it reads RESP2 too), returning `Oversized`
    for any bulk string longer than `max_bytes`."""

    class CappedParser(_RESP3Parser):
        def _read_response(self, *args: Any, timeout: Any = SENTINEL, **kwargs: Any) -> Any:
            position = self._buffer.get_pos()
            header = self._buffer.readline(timeout=timeout)
            if header[:1] == b"$" and header[1:] != b"-1" and int(header[1:]) > max_bytes:
                _drain(self._buffer, int(header[1:]) + 2, timeout)  # + the CRLF after the data
                return Oversized(int(header[1:]))
            self._buffer.rewind(position)
            return super()._read_response(*args, timeout=timeout, **kwargs)

    return CappedParser


class CappedClient(redis.Redis):
    """The client kombu pops messages with: an oversized message is dead-lettered, not delivered."""

    def __init__(self, *args: Any, max_message_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_message_bytes = max_message_bytes

    def parse_response(self, connection: Any, command_name: str | bytes, **options: Any) -> Any:
        response = super().parse_response(connection, command_name, **options)
        if command_name == "BRPOP" and response and isinstance(response[1], Oversized):
            self._refuse(response[1], response[0])
            return None  # kombu reads no message: Empty
        if command_name == "RPOP" and isinstance(response, Oversized):
            self._refuse(response, b"")
            return None
        return response

    def _refuse(self, message: Oversized, queue: bytes) -> None:
        reason = (
            f"a message of {message.length:,} bytes on {queue.decode(errors='replace') or 'a queue'}, over "
            f"KILN_MAX_MESSAGE_BYTES ({self.max_message_bytes:,}): dropped unread"
        )
        log.error("%s", reason)
        entry = json.dumps({"message": None, "reason": reason, "bytes": message.length})
        # Another connection of the pool: this one may be the BRPOP connection kombu polls on.
        with redis.Redis(connection_pool=self.connection_pool).pipeline() as pipe:
            pipe.lpush(DEAD_LETTERS, entry).ltrim(DEAD_LETTERS, 0, 999).execute()
