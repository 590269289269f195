"""A reply streamed to one session: many reliable messages a Redis call when
they come faster than Redis answers, one at a time when they do not."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

#: What ``wsproxy_publish_batch`` takes in one call.
MAX_BATCH = 1000


class ReliableStream:
    """Publishes one session's reliable messages in order, batching on its own.

    Made by :meth:`Wsproxy.reliable_stream`. :meth:`send` does not wait for
    Redis: it queues the message and returns a future of its offset. One
    call (``FCALL wsproxy_publish_batch``) is in flight at a time; what is
    sent meanwhile goes in the next call, all of it (up to ``max_batch``).
    So a token stream faster than Redis's round trip costs one call per
    round trip, and a slow one is published at once, with no timer and no
    added wait. Messages are stored in the order they were sent.

    A call that fails ends the stream, so that the reply never has a gap a
    client could not see: the futures of its messages and of every message
    queued behind it fail with its error, nothing more is published, and
    from then on :meth:`send` raises that error and :meth:`flush` (and
    leaving ``async with``) raises it. What was stored before the failure
    stays stored; so may the failed call's messages when the failure is a
    lost connection or a timeout rather than Redis' refusal (Redis may have
    run the call before its answer was lost: see
    :meth:`Wsproxy.send_reliable`). There is no reset: to go on, make a new stream (and tell
    the client what is missing). A batch is all or nothing: one message
    that is not fit (not JSON, say) fails the messages of its call with a
    :class:`~wsproxy_backend.models.WsproxyError` naming it, and none of
    them is stored.

    Example::

        async with wsproxy.reliable_stream("s1") as stream:
            async for token in model.generate(prompt):
                stream.send({"type": "token", "text": token})
        # leaving the block waits until all of it is stored, and raises if any failed
    """

    def __init__(
        self,
        publish_many: Callable[[Sequence[str]], Awaitable[list[str]]],
        encode: Callable[[Any], str],
        *,
        max_batch: int = MAX_BATCH,
    ) -> None:
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be 1 to {MAX_BATCH}")
        self._publish_many = publish_many
        self._encode = encode
        self._max_batch = max_batch
        self._queue: list[tuple[str, asyncio.Future[str]]] = []
        self._sender: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        #: Calls made so far (how well it batched: messages / calls).
        self.calls = 0
        #: Messages stored so far.
        self.stored = 0

    @property
    def error(self) -> BaseException | None:
        """The error that ended the stream, ``None`` while it has not failed."""
        return self._error

    def send(self, data: Any) -> asyncio.Future[str]:
        """Queues ``data`` (as JSON); the future gives its offset once stored.

        Raises the stream's error once a call has failed (see the class)."""
        return self.send_raw(self._encode(data))

    def send_raw(self, payload: str) -> asyncio.Future[str]:
        """:meth:`send` for a payload that is JSON text already."""
        if self._error is not None:
            raise self._error
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append((payload, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_queued())
        return future

    async def flush(self) -> None:
        """Waits until everything sent so far is stored; raises the error of
        the failed call if one failed (every time: the stream has ended)."""
        while self._sender is not None and not self._sender.done():
            await asyncio.shield(self._sender)
        if self._error is not None:
            raise self._error

    async def _send_queued(self) -> None:
        while self._queue:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            try:
                offsets = await self._publish_many([payload for payload, _ in batch])
            except Exception as e:  # the stream ends: sending what follows would leave a gap
                self._error = e
                failed, self._queue = batch + self._queue, []
                for _, future in failed:
                    if not future.done():
                        future.set_exception(e)
                        # Read here so that an unawaited future does not log.
                        future.exception()
                return
            self.calls += 1
            self.stored += len(batch)
            for (_, future), offset in zip(batch, offsets, strict=True):
                if not future.done():
                    future.set_result(offset)

    async def __aenter__(self) -> ReliableStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.flush()
