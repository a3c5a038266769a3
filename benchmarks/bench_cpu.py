"""CPU per operation of a ``pbft bench`` run, all processes: the replicas' and the client
process's CPU time, sampled from /proc every 0.2 s, over the middle 60% of the replicated phase
(while all the replicas are up), divided by the operations the bench measured in that time.

    python benchmarks/bench_cpu.py OUT.json -- pbft bench --op 0/0 --storage memory --duration 8 --json

Prints one JSON line: CPU seconds per second of the replicas and of the client process, CPU per
operation (µs), and whether every replica process had mapped the compiled modules (``native``).
OUT.json keeps the bench's result and the samples. Linux only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        p = f.read().rsplit(")", 1)[1].split()
    return (int(p[11]) + int(p[12])) / TCK


def parent(pid: str) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def replicas(root: int) -> list[int]:
    """The replica processes started under ``root`` (the bench): other clusters on the machine
    are not counted."""
    out, parents = [], {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parents[int(d)] = parent(d)
                argv = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"replica" in argv and any(b"pbft" in a for a in argv):
                out.append(int(d))

    def under(pid: int) -> bool:
        for _ in range(16):
            pid = parents.get(pid, 0)
            if pid == root:
                return True
            if pid <= 1:
                return False
        return False
    return [pid for pid in out if under(pid)]


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    samples, native = [], {}
    while p.poll() is None:
        t, rs, tot = time.monotonic(), replicas(p.pid), 0.0
        for pid in rs:
            try:
                tot += cpu_s(pid)
                if not native.get(pid):
                    with open(f"/proc/{pid}/maps") as f:
                        native[pid] = "pbft_native__mypyc" in f.read()
            except OSError:
                pass
        try:
            me = cpu_s(p.pid)
        except OSError:
            break
        samples.append((t, len(rs), tot, me))
        time.sleep(0.2)
    res = json.loads(p.stdout.read())
    n = res.get("replicas", 4)
    win = [s for s in samples if s[1] >= n]
    a, b = win[len(win) // 5], win[len(win) * 4 // 5]
    dt = b[0] - a[0]
    ops = res["replicated"]["ops_per_s"]
    rep, cl = (b[2] - a[2]) / dt, (b[3] - a[3]) / dt
    with open(out, "w") as f:
        json.dump({"result": res, "samples": samples, "native": native}, f)
    print(json.dumps({"ops_per_s": ops, "p50_ms": res["replicated"]["p50_ms"], "window_s": round(dt, 2),
                      "replicas_cpu_per_s": round(rep, 3), "client_cpu_per_s": round(cl, 3),
                      "replicas_us_per_op": round(rep / ops * 1e6, 1),
                      "all_us_per_op": round((rep + cl) / ops * 1e6, 1),
                      "native": bool(native) and all(native.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
