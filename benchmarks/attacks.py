#!/usr/bin/env python3
"""The attack suite against a live local cluster: a thin wrapper around ``pbft attack``.

Usage (from the repository root)::

    python benchmarks/attacks.py                                  # every attack, 10 s each
    python benchmarks/attacks.py --attacks keyless --duration-s 5
    python benchmarks/attacks.py --json > attacks.json            # one JSON object
    python benchmarks/attacks.py --enforce-floors                 # exit 1 if an attack misses its floor

Every argument is passed to ``pbft attack`` (``--help`` lists them); docs/attacks.md says what is
measured and how to read it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pbft.tools.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["attack", *sys.argv[1:]]))
