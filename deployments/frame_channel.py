"""Frames from the router to an editor replica over one kept-open TCP connection, not through a Serve handle.

Why: a DeploymentHandle call costs its caller 1.8 ms of CPU and 3.5 ms of wall time on this project's 2-core
machine, a Ray actor call 0.6 and 1.2 ms, a message on an open connection 0.02 and 0.04 ms (bench/frame_hop.py;
bench/RESULTS.md, "The frame channel"); the handle call was most of the router's CPU a frame. Serve still
carries everything but the frames: admission, drain, info, stats, health checks, scaling.
Written by hand: Serve 2.60 has no direct call path from one deployment's replica to a chosen replica of another.

Wire format: every message is a 4-byte big-endian length and then its bytes. A connection opens with the replica's
token (sent raw; learnt by the router over Serve, in the replica's admission_state), compared before anything is
unpickled; a wrong token closes the connection. Then pickles (protocol 5, so image bytes are copied once):
    router -> replica   ("edit", id, args)     ("cancel", id)
    replica -> router   ("ok", id, reply)      ("raised", id, (type name, message))     ("leaving", 0, reason)
"leaving" is sent when the replica shuts down: frames in flight still get their replies, new ones are refused with
the reason (the router tells the session to reconnect).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import pickle
import secrets
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("ray.serve")

HEADER = struct.Struct("!I")
TOKEN_BYTES = 32
MAX_MESSAGE = 512 * 1024 * 1024  # a frame, its references and a reply fit many times over; garbage does not


class ChannelClosed(Exception):
    """The replica's channel is closed. `sent`: the request had been written (the replica may have begun it);
    `leaving`: the replica said it was shutting down, and why."""

    def __init__(self, message: str, *, sent: bool, leaving: str | None = None):
        super().__init__(message)
        self.sent, self.leaving = sent, leaving


class ChannelRemoteError(Exception):
    """The replica's handler raised (not an edit error, which comes back as data): its type name and message."""

    def __init__(self, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name


def _pack(message: tuple) -> bytes:
    body = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader, limit: int = MAX_MESSAGE) -> bytes:
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > limit:
        raise ValueError(f"a message of {size} bytes is over the channel's limit of {limit}")
    return await reader.readexactly(size)


# ---- the replica's side -----------------------------------------------------------------------------------------
class ChannelServer:
    """Serves `handler(*args)` for every "edit" on its own thread and event loop, so Serve's loop (health checks,
    admission calls) never waits behind frames."""

    def __init__(self, handler: Callable[..., Awaitable[Any]], host: str, port: int = 0):
        self.handler, self.token = handler, secrets.token_hex(TOKEN_BYTES // 2)
        self.loop = asyncio.new_event_loop()
        self.tasks: set[asyncio.Task] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.leaving: str | None = None
        self.refused = 0  # connections that did not give the token
        self.error: OSError | None = None
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(host, port, started), name="frame-channel",
                                       daemon=True)
        self.thread.start()
        started.wait()
        if self.error is not None:
            raise self.error

    def _run(self, host: str, port: int, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = self.loop.run_until_complete(asyncio.start_server(self._connection, host, port))
            self.host, self.port = host, self.server.sockets[0].getsockname()[1]
        except OSError as exc:
            self.error = OSError(f"the frame channel cannot listen on {host}:{port}: {exc.strerror or exc}")
        started.set()
        if self.error is None:
            self.loop.run_forever()

    def address(self) -> dict[str, Any]:
        """What the router needs to connect (it reaches the router over Serve, never over this channel)."""
        return {"host": self.host, "port": self.port, "token": self.token}

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            given = await asyncio.wait_for(_read(reader, TOKEN_BYTES), 10)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, ConnectionError):
            given = b""
        if not hmac.compare_digest(given, self.token.encode()):
            self.refused += 1
            logger.warning("frame channel: refused a connection from %s without the token",
                           writer.get_extra_info("peername"))
            writer.close()
            return
        self.writers.add(writer)
        mine: dict[int, asyncio.Task] = {}
        try:
            if self.leaving is not None:
                writer.write(_pack(("leaving", 0, self.leaving)))
            while True:
                kind, request_id, payload = pickle.loads(await _read(reader))
                if kind == "edit":
                    task = self.loop.create_task(self._serve(writer, request_id, payload))
                    mine[request_id] = task
                    self.tasks.add(task)
                    task.add_done_callback(lambda t, i=request_id: (self.tasks.discard(t), mine.pop(i, None)))
                elif kind == "cancel" and request_id in mine:
                    mine[request_id].cancel()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the router closed the connection (or went away): its frames are cancelled below
        except Exception:  # noqa: BLE001 - a message that is not ours: this connection ends, the others go on
            logger.exception("frame channel: closing a connection after a bad message")
        finally:
            for task in list(mine.values()):
                task.cancel()
            self.writers.discard(writer)
            writer.close()

    async def _serve(self, writer: asyncio.StreamWriter, request_id: int, args: tuple) -> None:
        try:
            message = ("ok", request_id, await self.handler(*args))
        except asyncio.CancelledError:
            return  # the router gave up on it (timeout, client gone): nobody waits for a reply
        except Exception as exc:  # noqa: BLE001 - reported to the router, which fails the frame
            logger.exception("frame channel: the handler raised")
            message = ("raised", request_id, (type(exc).__name__, str(exc)))
        if not writer.is_closing():
            writer.write(_pack(message))
            try:
                await writer.drain()
            except ConnectionError:
                pass  # the router went away; _connection cancels the rest

    def close(self, reason: str, grace_s: float) -> None:
        """Tells every router it is leaving, lets frames in flight finish (up to grace_s), then stops (thread-safe)."""
        if not self.thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._close(reason, grace_s), self.loop)
        try:
            future.result(grace_s + 5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    async def _close(self, reason: str, grace_s: float) -> None:
        self.leaving = reason
        self.server.close()
        for writer in list(self.writers):
            writer.write(_pack(("leaving", 0, reason)))
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace_s)
        for writer in list(self.writers):
            writer.close()


# ---- the router's side ------------------------------------------------------------------------------------------
class ChannelClient:
    """One connection to one replica's ChannelServer, opened at the first call; calls share it, matched by id."""

    def __init__(self, replica: str, address: dict[str, Any], connect_timeout_s: float = 5.0):
        self.replica, self.address, self.connect_timeout_s = replica, dict(address), connect_timeout_s
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task | None = None
        self.closed: str | None = None  # why it can take no more calls
        self.leaving: str | None = None
        self._connecting = asyncio.Lock()

    def _where(self) -> str:
        return f"editor replica {self.replica}'s frame channel at {self.address['host']}:{self.address['port']}"

    async def _connect(self) -> None:
        async with self._connecting:
            if self.writer is not None or self.closed is not None:
                return
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.address["host"], self.address["port"]), self.connect_timeout_s)
            except (OSError, asyncio.TimeoutError) as exc:
                self.closed = f"cannot reach {self._where()} ({type(exc).__name__})"
                raise ChannelClosed(self.closed, sent=False) from None
            token = self.address["token"].encode()
            writer.write(HEADER.pack(len(token)) + token)
            self.writer = writer
            self.reader_task = asyncio.get_running_loop().create_task(self._replies(reader))

    async def _replies(self, reader: asyncio.StreamReader) -> None:
        reason = "closed"
        try:
            while True:
                kind, request_id, payload = pickle.loads(await _read(reader))
                if kind == "leaving":
                    self.leaving = str(payload)
                    continue
                future = self.pending.pop(request_id, None)
                if future is None or future.done():
                    continue  # cancelled here already
                if kind == "ok":
                    future.set_result(payload)
                else:
                    future.set_exception(ChannelRemoteError(*payload))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            reason = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - a reply that is not ours: the calls waiting on it fail
            logger.exception("frame channel: a bad reply from %s", self._where())
            reason = f"bad reply: {type(exc).__name__}"
        finally:
            self.close(f"{self._where()} closed ({reason})")

    def close(self, reason: str) -> None:
        """No more calls; every call waiting fails (ChannelClosed, sent=True)."""
        if self.closed is None:
            self.closed = reason
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ChannelClosed(self.closed, sent=True, leaving=self.leaving))
        if self.writer is not None:
            self.writer.close()
        if self.reader_task is not None and self.reader_task is not asyncio.current_task():
            self.reader_task.cancel()

    async def call(self, *args: Any) -> Any:
        """handler(*args) on the replica; a cancelled call (timeout, client gone) is cancelled there too."""
        if self.leaving is not None:
            raise ChannelClosed(f"editor replica {self.replica} is leaving: {self.leaving}", sent=False,
                                leaving=self.leaving)
        if self.writer is None:
            await self._connect()
        if self.closed is not None:
            raise ChannelClosed(self.closed, sent=False, leaving=self.leaving)
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        try:
            self.writer.write(_pack(("edit", request_id, args)))
            await self.writer.drain()
        except ConnectionError as exc:
            self.close(f"{self._where()} closed ({type(exc).__name__})")  # fails `future` with sent=True
        try:
            return await future
        except asyncio.CancelledError:
            if self.pending.pop(request_id, None) is not None and self.closed is None:
                self.writer.write(_pack(("cancel", request_id, None)))
            raise
