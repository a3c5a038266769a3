"""``pbft bench``: the micro-benchmarks of Castro & Liskov, replicated vs unreplicated.

    pbft bench [--op 0/0|0/4|4/0] [--read-only] [--replicas N] [--clients C] [--duration S]
               [--warmup S] [--sweep] [--json] [--plot FILE.png] [--client-procs K]
    pbft bench --report [--duration S] [--warmup S] [--clients C] [--json] [--client-procs K]

What one run does:

1. writes two cluster directories in a temporary directory, on free loopback
   ports: a cluster of ``--replicas`` replicas (f = (n-1)//3) and a cluster
   of one (n=1, f=0) for the unreplicated baseline, each with C client
   identities;
2. starts the replicas (``pbft replica DIR --id I --service
   pbft.services.null:NullService --quiet``, one process each), waits until
   they are all connected to each other, and measures them; then stops them,
   starts the unreplicated server (``python -m pbft.tools.bench serve-unreplicated
   DIR``: ``pbft.runtime.unreplicated``, the same service, transport, frames,
   session keys and MACs, and the same client library) and measures it.  The
   two never run at the same time, so they do not compete for the CPU;
3. prints throughput and latency percentiles of both and their ratios
   (replicated / unreplicated): a throughput ratio below 1 and latency ratios
   above 1 are the cost of replication.

The operations are the paper's: a/b means an argument of a KB and a result
of b KB (``pbft.services.null``; 0/0 is the empty operation).  ``--read-only``
sends them as read-only requests (PBFT's read-only optimisation: no
ordering, 2f+1 matching replies).

Measurement: C closed-loop clients (each its own client identity, at most one
request outstanding, no think time) run for ``--warmup`` seconds (default 1,
not measured) and then ``--duration`` seconds.  Throughput is the number of
operations completed inside the measured window divided by its length;
latencies are those of the same operations, from ``invoke`` to the certified
result, measured in the client.  ``--sweep`` measures each system at 1, 2, 4,
... clients up to C (a new warm-up for every point) and ``--plot`` draws
latency against throughput (matplotlib, imported only then).

How the clients run: every client identity is driven by
``pbft.runtime.client.ClientPool``, which multiplexes any number of
identities over one TCP connection per replica.  By default all C clients
run in one process, the ``pbft bench`` process itself (one uvloop event
loop), for both systems.  ``--client-procs K`` spreads them over K processes
(the bench process plus K-1 ``python -m pbft.tools.bench load-worker``
subprocesses that start together and report their counts and latencies back).

Why one process by default -- CPU time per operation measured on the 2-core
development machine (0/0, 32 clients): read-write, each of the 4 replicas
~58 us and the client ~57 us (it MACs the request for 4 replicas and checks 4
replies); read-only, each replica ~14 us and the client ~55 us; unreplicated,
the server ~10 us and the client ~21 us.  Splitting the clients over two
processes costs ~15-25% more client CPU per operation (less coalescing per
connection).  So on 2 idle cores the replicated runs are bound by the CPU of
the whole machine, or (read-only) evenly by the client process and the
replicas, and one client process is the cheapest way to drive them; only the
unreplicated server is limited by a single client process (the server then
uses about half a core), and ``--client-procs 2`` lifts that bound by about a
fifth there.  When other work competes for the cores, more client processes
also win the clients a larger share of the CPU, which inflates both systems'
figures; keep K the same when comparing runs.  Clients share the machine with
the servers (in the paper they had machines of their own), so absolute
figures here are lower bounds; the ratios compare two systems driven
identically.

``--report`` measures every row of the project's performance targets in one run (``targets``:
the replicated cluster with memory storage, then with durable storage, then the unreplicated
server; 11 points of ``--duration``, default 3 s, each after its warm-up) and prints the table:
each measure's figure, its baseline, their ratio, the target and whether it is met, then CPU per
operation by process (the primary, each backup on average, the client process) and every point.
CPU time is read from ``/proc/<pid>/stat`` at the two ends of each measured window, for every
process of the system measured, the client processes included.

Processes: replicas, the unreplicated server and load workers are started in
their own sessions (a Ctrl-C in the terminal reaches only ``pbft bench``),
with Linux's parent-death signal set so that they get SIGTERM if ``pbft
bench`` dies, and are stopped (SIGTERM, then SIGKILL) when it exits for any
reason, including Ctrl-C, SIGTERM and errors.  Their logs go to the
temporary directory, which is removed at the end unless the run failed
(then the error message names it).
"

Modules: ``stats`` (arguments, percentiles, summaries, ratios), ``targets`` (``--report``'s points,
CPU accounting and table), ``load`` (the
closed-loop clients, in this process and in load workers), ``report`` (progress,
the table, the plot), ``run`` (the command: the two systems, one point, the
whole run) and ``__main__`` (the internal entry points of the child processes).
Child processes are started and stopped by ``pbft.tools.procs``.
"""

from .run import add_bench_command, cmd_bench
from .stats import parse_op, percentile, ratios, summarize, sweep_counts

__all__ = ["add_bench_command", "cmd_bench", "parse_op", "percentile", "ratios", "summarize", "sweep_counts"]
