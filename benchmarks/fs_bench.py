"""BFS against unreplicated BFS, sshfs over loopback and a local directory: ``pbft bench-fs``.

    python benchmarks/fs_bench.py [--scale 1,10] [--runs 3] [--json] [--plot FILE.png] ...

The same as ``pbft bench-fs`` (``pbft.services.bfs.bench``, docs/bfs.md, *Performance*).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pbft.services.bfs.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
