"""The core does no I/O and reads no clock or randomness: checked on the source."""

import ast
import pathlib

import pbft

SRC = pathlib.Path(pbft.__file__).parent
CORE = [SRC / "config.py", SRC / "messages.py", SRC / "codec.py", SRC / "crypto.py", SRC / "service.py",
        *sorted((SRC / "core").glob("*.py"))]
FORBIDDEN = {"time", "random", "asyncio", "socket", "os", "threading", "select", "secrets", "datetime"}


def test_core_imports_nothing_impure():
    for path in CORE:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [(node.module or "").split(".")[0]]
            bad = set(names) & FORBIDDEN
            assert not bad, f"{path.name} imports {bad}"
