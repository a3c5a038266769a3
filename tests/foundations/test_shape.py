"""The core's shape, kept: ``core/replica.py`` (the dispatcher and the steps that cross
components) stays at most 600 lines, and no function in ``core/`` is longer than 60 lines (a
longer one is split into steps named for what they do; docs/architecture.md)."""

import ast
import pathlib

import pbft

CORE = pathlib.Path(pbft.__file__).parent / "core"
REPLICA_LINES_MAX = 600
FUNCTION_LINES_MAX = 60


def long_functions(tree: ast.AST, limit: int) -> list[tuple[str, int, int]]:
    """``(name, first line, lines)`` of every function or method longer than ``limit`` lines,
    from its ``def`` line to its last (decorators and docstring included)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            assert node.end_lineno is not None
            n = node.end_lineno - first + 1
            if n > limit:
                out.append((node.name, first, n))
    return out


def test_replica_module_stays_small():
    n = len((CORE / "replica.py").read_text().splitlines())
    assert n <= REPLICA_LINES_MAX, f"core/replica.py has {n} lines: move a step into the component that owns it"


def test_no_function_in_core_is_longer_than_60_lines():
    found = {}
    for path in sorted(CORE.glob("*.py")):
        long = long_functions(ast.parse(path.read_text()), FUNCTION_LINES_MAX)
        if long:
            found[path.name] = long
    assert not found, f"split these into named steps: {found}"


def test_the_length_check_sees_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    assert long_functions(ast.parse(f"def f():\n{body}\n"), FUNCTION_LINES_MAX) == [("f", 1, 61)]
    assert long_functions(ast.parse(f"@d\ndef f():\n{body}\n"), FUNCTION_LINES_MAX) == [("f", 1, 62)]
    assert long_functions(ast.parse("def f():\n    pass\n"), FUNCTION_LINES_MAX) == []
