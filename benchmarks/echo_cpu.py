"""CPU per round trip of two uvloop processes echoing 100 bytes, over loopback TCP or a
Unix-domain socket: ``python benchmarks/echo_cpu.py [--unix] [--rounds N]``.

Each message of a replicated request is a write that wakes a process asleep in ``epoll``; this
measures what one such exchange costs the two processes on the machine it runs on (each side's
CPU time per round trip, user and kernel), with nothing else in the way: no frames, no MACs, no
core. Run it a few times: whether the kernel puts the two processes on one CPU or on two changes
the figure several times over (``docs/performance.md``, *The runtime's per-message cost*).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import tempfile
import time

import uvloop

MESSAGE = b"x" * 100


class _Echo(asyncio.Protocol):
    def __init__(self, rounds: int = 0, done: "asyncio.Future[tuple[float, float]] | None" = None):
        self.rounds = rounds
        self.done = done
        self.n = 0
        self.t0 = self.c0 = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.done is not None:  # the client starts
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            transport.write(MESSAGE)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.done is None:  # the server echoes
            self.transport.write(data)
            return
        self.n += 1
        if self.n >= self.rounds:
            self.done.set_result((time.perf_counter() - self.t0, time.process_time() - self.c0))
            return
        self.transport.write(data)


async def _serve(addr, unix: bool, ready_fd: int) -> None:
    loop = asyncio.get_running_loop()
    if unix:
        await loop.create_unix_server(_Echo, addr)
    else:
        await loop.create_server(_Echo, addr[0], addr[1])
    os.write(ready_fd, b"r")
    await asyncio.sleep(3600)


async def _client(addr, unix: bool, rounds: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[float, float]] = loop.create_future()
    if unix:
        await loop.create_unix_connection(lambda: _Echo(rounds, done), addr)
    else:
        await loop.create_connection(lambda: _Echo(rounds, done), addr[0], addr[1])
    return await done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unix", action="store_true", help="a Unix-domain socket instead of loopback TCP")
    ap.add_argument("--rounds", type=int, default=20000)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    if a.unix:
        addr: object = os.path.join(tmp, "echo.sock")
    else:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        addr = s.getsockname()
        s.close()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        uvloop.run(_serve(addr, a.unix, w))
        os._exit(0)
    os.close(w)
    os.read(r, 1)
    wall, cpu = uvloop.run(_client(addr, a.unix, a.rounds))
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = a.rounds
    print(f"{'unix' if a.unix else 'tcp'}: {wall / n * 1e6:.1f} us per round trip; CPU per round trip: "
          f"client {cpu / n * 1e6:.1f} us, server {(ru.ru_utime + ru.ru_stime) / n * 1e6:.1f} us "
          f"(kernel {ru.ru_stime / n * 1e6:.1f} us)")
    if a.unix:
        os.unlink(str(addr))
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
