"""What a write on loopback TCP costs the writer when it wakes a reader asleep in ``epoll``,
against one that wakes nobody: ``python benchmarks/wake_write.py [--readers K] [--rounds N]``.

A replica's normal-case request is a chain of such writes (the client's request to each
replica, the pre-prepare, the prepares, the commits, the replies: 32 writes for one request on a
4-replica cluster with one client, ``tests/core/test_message_economy.py``), and at one client
nearly every one of them wakes a process that was waiting for it. The figures bound what the
kernel's part of a request costs on the machine it runs on.

The writer sends 100 bytes to each of K reader processes in turn (each reader in its own
process, asleep in ``epoll`` on its socket; the last one answers on a pipe), waits for the
answer, sleeps 0.5 ms so that every reader is asleep again, and times each ``send``. Then it
times sends on a connection nobody waits on (the kernel queues the bytes; no wake-up).
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import time


def _pair() -> tuple[socket.socket, socket.socket]:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    lst.close()
    for x in (c, s):
        x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c, s


def _reader(s: socket.socket, ack: int) -> None:
    ep = select.epoll()
    ep.register(s.fileno(), select.EPOLLIN)
    while True:
        ep.poll()
        d = s.recv(4096)
        if not d:
            os._exit(0)
        if ack >= 0:
            os.write(ack, b"x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2000)
    a = ap.parse_args()
    k = a.readers
    pairs = [_pair() for _ in range(k)]
    ack_r, ack_w = os.pipe()
    kids = []
    for i in range(k):
        pid = os.fork()
        if pid == 0:
            for j, (c, s) in enumerate(pairs):
                c.close()  # (so that the writer's close is the reader's end of file)
                if j != i:
                    s.close()
            os.close(ack_r)
            _reader(pairs[i][1], ack_w if i == k - 1 else -1)
        kids.append(pid)
    for _, s in pairs:
        s.close()
    os.close(ack_w)
    woke: list[list[float]] = [[] for _ in range(k)]
    for _ in range(a.rounds):
        for i in range(k):
            t0 = time.perf_counter()
            pairs[i][0].send(b"x" * 100)
            woke[i].append(time.perf_counter() - t0)
        os.read(ack_r, 1)
        time.sleep(0.0005)
    for c, _ in pairs:
        c.close()
    for pid in kids:
        os.waitpid(pid, 0)
    for i in range(k):
        print(f"write {i + 1} of {k}, waking a reader asleep in epoll: p50 {statistics.median(woke[i]) * 1e6:.1f} us, "
              f"mean {statistics.fmean(woke[i]) * 1e6:.1f} us")
    c, s = _pair()
    quiet = []
    for n in range(a.rounds):
        t0 = time.perf_counter()
        c.send(b"x" * 100)
        quiet.append(time.perf_counter() - t0)
        if n % 100 == 99:
            s.recv(1 << 20)
    print(f"write waking nobody: p50 {statistics.median(quiet) * 1e6:.1f} us, "
          f"mean {statistics.fmean(quiet) * 1e6:.1f} us")


if __name__ == "__main__":
    main()
