"""A loopback TCP relay that delays data like a network: for benchmarks and tests of fetching from far away.

:class:`DelayProxy` listens on ``127.0.0.1`` (only) and relays each connection to an upstream ``(host, port)``,
itself on loopback. Every chunk of data, in each direction, is held for ``delay_ms`` milliseconds (the one-way
delay) from the moment it arrives and then sent on: a delay line, not a rate limit, so many chunks are in flight
at once and throughput is not capped at one chunk per delay; order within a direction is kept. A new connection
also pays one round trip (2 x delay) before its first bytes go upstream, as a TCP handshake would. A request and
its answer therefore take one round trip (``rtt_ms`` = 2 x ``delay_ms``) more than they would direct, and a request
on a fresh connection two.

The relay counts what a test or a benchmark needs to know about its clients: connections open now and at most,
and requests in flight (a connection is *busy* from the moment its client sends bytes until bytes of the answer
are delivered back to it: for HTTP/1.1 without pipelining, one request outstanding), now and at most.

Run it alone (a benchmark runs it in a process of its own, so that its work does not share the measured
process's interpreter lock)::

    python -m pipeline.bench.netdelay --upstream 127.0.0.1:5000 --delay-ms 10 [--port 0]

prints ``listening on 127.0.0.1:PORT`` and relays until it is terminated (SIGTERM or SIGINT), then prints its
counters as one JSON line (:class:`ProxyStats`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import threading
from collections import deque
from dataclasses import dataclass

__all__ = ["DelayProxy", "ProxyStats", "main"]

LOOPBACK = "127.0.0.1"
_HIGH_WATER = 4 << 20  # bytes held for one direction before its source is paused (the relay's memory bound)


@dataclass
class ProxyStats:
    """What a :class:`DelayProxy` saw. ``busy``: connections with a request in flight (see the module docstring)."""

    connections: int = 0  # accepted so far
    open: int = 0
    peak_open: int = 0
    busy: int = 0
    peak_busy: int = 0
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client


class _Line(asyncio.Protocol):
    """One direction's delay line: data received on this side's transport goes out on ``peer`` after the delay."""

    def __init__(self, relay: _Relay, upstream: bool) -> None:
        self.relay = relay
        self.upstream = upstream  # True: the upstream side's transport (its data goes down to the client)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[tuple[float, bytes | None]] = deque()  # (release time, data); None: end of stream
        self.held = 0
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.ended = False  # this side's end of stream has been passed on to the other side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.relay.arrived(self, data)

    def eof_received(self) -> bool:
        self.relay.arrived(self, None)
        return True  # keep the transport half-open: the other direction may still be talking

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.lost(self)


class _Relay:
    """One client connection and its upstream connection, with a delay line each way."""

    def __init__(self, proxy: DelayProxy, loop: asyncio.AbstractEventLoop) -> None:
        self.proxy = proxy
        self.loop = loop
        self.down = _Line(self, upstream=False)  # the client's side; its data goes up
        self.up = _Line(self, upstream=True)
        self.busy = False
        self.closed = False
        # One round trip for the handshake before the first bytes may go upstream.
        self.open_at = loop.time() + 2 * proxy.delay_s

    def arrived(self, line: _Line, data: bytes | None) -> None:
        """``data`` came in on ``line``'s transport: queue it for the other side at now + delay."""
        stats = self.proxy.stats
        if data is not None and not line.upstream:
            stats.bytes_up += len(data)
            if not self.busy:
                self.busy = True
                stats.busy += 1
                stats.peak_busy = max(stats.peak_busy, stats.busy)
        elif data is not None:
            stats.bytes_down += len(data)
        release = self.loop.time() + self.proxy.delay_s
        if not line.upstream:
            release = max(release, self.open_at)
        line.queue.append((release, data))
        line.held += len(data or b"")
        if line.held > _HIGH_WATER and not line.paused and line.transport is not None:
            line.transport.pause_reading()  # the far side is slower than this one: stop reading, bound memory
            line.paused = True
        if line.timer is None:
            line.timer = self.loop.call_at(line.queue[0][0], self.release, line)

    def release(self, line: _Line) -> None:
        """Send on everything of ``line`` whose time has come, in order; then wait for the next."""
        line.timer = None
        out = self.up if not line.upstream else self.down
        if out.transport is None:  # upstream not connected yet: _Relay's connect starts the line when it is
            return
        now = self.loop.time()
        while line.queue and line.queue[0][0] <= now:
            _, data = line.queue.popleft()
            if out.transport.is_closing():
                line.queue.clear()
                break
            if data is None:
                line.ended = True
                if self.up.ended and self.down.ended or not out.transport.can_write_eof():
                    self.down.transport.close()  # type: ignore[union-attr]
                    out.transport.close()
                    self.up.transport.close()  # type: ignore[union-attr]
                else:
                    out.transport.write_eof()
                continue
            line.held -= len(data)
            out.transport.write(data)
            if line.upstream and self.busy:  # the answer's bytes reached the client: the request is done
                self.busy = False
                self.proxy.stats.busy -= 1
        if line.paused and line.held <= _HIGH_WATER // 2 and line.transport is not None:
            line.transport.resume_reading()
            line.paused = False
        if line.queue:
            line.timer = self.loop.call_at(line.queue[0][0], self.release, line)

    def lost(self, line: _Line) -> None:
        """One side closed: close the other once what it still holds for that side has been sent."""
        if self.closed:
            return
        self.closed = True
        stats = self.proxy.stats
        stats.open -= 1
        if self.busy:
            self.busy = False
            stats.busy -= 1
        other = self.up if line is self.down else self.down
        pending = line.queue[-1][0] if line.queue else self.loop.time()
        delay = max(0.0, pending - self.loop.time()) + self.proxy.delay_s
        if other.transport is not None:
            self.loop.call_later(delay, other.transport.close)


class DelayProxy:
    """A delaying TCP relay on a free loopback port, in front of ``upstream`` (a loopback ``(host, port)``).

    ``delay_ms``: one-way delay added to every chunk in each direction (so ``rtt_ms`` = 2 x ``delay_ms``);
    0 relays without delay. The relay runs its own asyncio loop in a daemon thread; :attr:`port` is the port to
    connect to, :attr:`stats` its counters (read them any time; :meth:`reset_peaks` starts a new measurement).
    Use it as a context manager, or call :meth:`close`.

    Raises:
        ValueError: a negative delay, or a listening or upstream address off loopback.
    """

    def __init__(self, upstream: tuple[str, int], *, delay_ms: float, port: int = 0) -> None:
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        if upstream[0] not in (LOOPBACK, "localhost"):
            raise ValueError(f"the upstream must be on loopback (127.0.0.1), got {upstream[0]!r}")
        self.upstream = upstream
        self.delay_s = delay_ms / 1000
        self.stats = ProxyStats()
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        started = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(port, started, errors), name="delay-proxy",
                                        daemon=True)
        self._thread.start()
        started.wait()
        if errors:
            raise errors[0]
        assert self._server is not None
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the upstream's HTTP endpoint, seen through the relay."""
        return f"http://{LOOPBACK}:{self.port}"

    def _run(self, port: int, started: threading.Event, errors: list[BaseException]) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._server = self.loop.run_until_complete(self.loop.create_server(self._accepted, LOOPBACK, port,
                                                                                backlog=1024))
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor, which raises it
            errors.append(exc)
            started.set()
            return
        started.set()
        self.loop.run_forever()
        self.loop.close()

    def _accepted(self) -> asyncio.Protocol:
        relay = _Relay(self, self.loop)
        self.stats.connections += 1
        self.stats.open += 1
        self.stats.peak_open = max(self.stats.peak_open, self.stats.open)
        self.loop.create_task(self._connect(relay))
        return relay.down

    async def _connect(self, relay: _Relay) -> None:
        try:
            await self.loop.create_connection(lambda: relay.up, *self.upstream)
        except OSError:
            if relay.down.transport is not None:
                relay.down.transport.close()
            return
        if relay.down.queue and relay.down.timer is None:  # bytes that came before upstream was connected
            relay.down.timer = self.loop.call_at(relay.down.queue[0][0], relay.release, relay.down)

    def reset_peaks(self) -> None:
        """Start a new measurement: the peaks become the current values."""
        def reset() -> None:
            self.stats.peak_open, self.stats.peak_busy = self.stats.open, self.stats.busy

        self.loop.call_soon_threadsafe(reset)

    def close(self) -> None:
        """Stop listening and stop the loop (open connections are dropped)."""
        if not self.loop.is_running():
            return

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), self.loop)
        self._thread.join(timeout=10)

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT on loopback")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay, ms (round trip: twice)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on [default: a free one]")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with DelayProxy((host, int(port)), delay_ms=args.delay_ms, port=args.port) as proxy:
        print(f"listening on {LOOPBACK}:{proxy.port}", flush=True)
        stop.wait()
        print(json.dumps(dataclasses.asdict(proxy.stats)), flush=True)


if __name__ == "__main__":
    main()
