"""``python -m pbft.cli``: kept for callers of the old path; the command is ``pbft.tools.cli``."""

import sys

from .tools.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
