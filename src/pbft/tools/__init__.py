"""The ``pbft`` command and its tools: ``cli`` (the argument parser, ``sim``, ``demo``), ``net``
(init, replica, up, recover, kv, status), ``bench``, ``demo``, ``attack`` and ``procs``, the
one supervisor of the child processes they start.  The only part of the package that parses
arguments or starts processes."""
