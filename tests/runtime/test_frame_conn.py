"""``FrameConn``'s receive path without sockets: the byte stream cut anywhere, frames come out
whole, in order, once each, as ``bytes``; the per-turn budget and ``hold`` keep the rest."""

from __future__ import annotations

import asyncio
import random

from pbft.runtime.transport import Counters, FrameConn, frame


class FakeTransport:
    def __init__(self):
        self.reading = True

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def get_extra_info(self, name):
        return None

    def is_closing(self):
        return False

    def close(self):
        pass


def make(budget=1 << 30, max_frame=1 << 22):
    got: list[bytes] = []
    c = Counters()
    conn = FrameConn(lambda cn, raw: got.append(raw), c, max_frame, budget, 1 << 26)
    conn.connection_made(FakeTransport())
    return conn, got, c


def payloads(rng, k):
    sizes = [0, 1, 3, 4, 5, 100, 1000, 70_000] + [rng.randrange(0, 3000) for _ in range(k)]
    return [bytes(rng.getrandbits(8) for _ in range(n)) if n < 5000 else rng.randbytes(n) for n in sizes]


def test_frames_cut_anywhere_come_out_whole_in_order_once():
    async def main():
        rng = random.Random(7)
        for trial in range(30):
            conn, got, c = make()
            frames = payloads(rng, 40)
            stream = b"".join(frame(p) for p in frames)
            i = 0
            while i < len(stream):  # reads of 1 byte to 9 KB, cut anywhere
                j = min(len(stream), i + rng.choice([1, 2, 3, 7, 64, 500, 4096, 9000]))
                conn.data_received(stream[i:j])
                i = j
            assert got == frames, trial
            assert all(type(raw) is bytes for raw in got)
            assert c.frames_in == len(frames) and c.bytes_in == len(stream)
            assert conn.off == len(conn.buf)  # nothing held

    asyncio.run(main())


def test_budget_pauses_reading_and_the_next_turn_goes_on_in_order():
    async def main():
        conn, got, c = make(budget=4)
        frames = [b"f%d" % i for i in range(10)]
        stream = b"".join(frame(p) for p in frames)
        conn.data_received(stream[:-3])  # the last frame incomplete
        assert got == frames[:4] and conn.paused and not conn.transport.reading
        conn.data_received(stream[-3:])  # arrives while paused: kept behind the others
        assert got == frames[:4]
        await asyncio.sleep(0)
        assert got == frames[:8]
        await asyncio.sleep(0)
        assert got == frames and c.frames_in == 10 and conn.transport.reading

    asyncio.run(main())


def test_hold_keeps_buffered_frames_until_released():
    async def main():
        conn, got, _ = make()
        frames = [b"a", b"b", b"c", b"d"]

        def on_frame(cn, raw):
            got.append(raw)
            if raw == b"b":
                cn.hold(0.01)
        conn.on_frame = on_frame
        conn.data_received(b"".join(frame(p) for p in frames[:3]))
        conn.data_received(frame(frames[3]))
        assert got == frames[:2]
        await asyncio.sleep(0.05)
        assert got == frames

    asyncio.run(main())


def test_oversized_frame_closes_the_connection():
    async def main():
        conn, got, c = make(max_frame=100)
        conn.data_received(frame(b"ok") + frame(bytes(101)) + frame(b"never"))
        assert got == [b"ok"] and conn.closed and c.drops == {"oversized-frame": 1}

    asyncio.run(main())
