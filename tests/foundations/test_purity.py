"""The package's layering, checked on the source (every import, function-level ones included).

Layers, from the bottom (a module imports only its own layer and those below):

    messages, config, crypto, digests    values, limits, MACs, digests (errors: DecodeError)
    codec                                bytes <-> messages
    state, service                       the replicated state and the service interface
    core                                 the replica and client state machines
    storage, services                    disks; the shipped services
    sim, runtime                         the drivers: simulator, asyncio runtime
    tools                                the pbft command, bench, demo, attack, procs

and:
- no ``_private`` name is imported from another module of the package;
- the pure layers (messages, config, crypto, digests, errors, codec, state, service, core) import
  no I/O, clock or randomness module;
- only ``tools/`` parses arguments or starts processes (argparse, subprocess).

``ALLOWED`` lists the violations that remain, each with the reason and the owner who is to
remove it; an entry that is no longer needed fails the test too, so the list only shrinks.
"""

import ast
import pathlib

import pbft

SRC = pathlib.Path(pbft.__file__).parent

LAYERS = [
    {"_native", "messages", "config", "crypto", "digests", "errors"},  # _native: the compiled modules' finder
    {"codec"},
    {"state", "service"},
    {"core"},
    {"storage", "services"},
    {"sim", "runtime"},
    {"tools", "cli", "cli_net"},  # cli, cli_net: the old paths of tools/cli.py and tools/net.py
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
PURE = {"messages", "config", "crypto", "digests", "errors", "codec", "state", "service", "core"}
IMPURE_MODULES = {"time", "random", "asyncio", "socket", "os", "threading", "select", "secrets", "datetime",
                  "subprocess", "signal", "shutil", "tempfile", "pathlib", "io", "urllib", "http", "lmdb",
                  "uvloop", "trio", "pyfuse3", "multiprocessing", "concurrent", "ctypes", "sys"}
TOOLS_ONLY = {"argparse", "subprocess"}

# Violations left for the owners of other areas: a module prefix and the rules it may still
# break, with the reason.  Anything else fails; an entry nothing needs any more fails too.
ALLOWED = {
    # BFS is another work area: its mount/umount commands, its demo and its benchmark start
    # processes, parse arguments and drive clusters (runtime, tools); they belong in tools/
    # (e.g. tools/bfs/ on tools.procs), the file system service staying in services/bfs/.
    "pbft.services.bfs.": ({"down", "tools-only"}, "BFS commands, demo and bench: to move to tools/"),
}


def allowed(key) -> bool:
    rule, mod, _ = key
    return any(mod.startswith(prefix) and rule in rules for prefix, (rules, _) in ALLOWED.items())


def modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), is_pkg, path


def imports(mod: str, is_pkg: bool, tree: ast.AST):
    """(imported module, names imported from it, line) for every import, relative ones resolved."""
    package = mod if is_pkg else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            yield target, names, node.lineno
            for n in names:  # ``from . import x`` may import the module ``x``
                yield f"{target}.{n}", [], node.lineno


def area(mod: str) -> str | None:
    """The layer name of a ``pbft`` module (``pbft.core.replica`` -> ``core``), None for ``pbft``."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pbft" else None


def is_module(mod: str) -> bool:
    rel = pathlib.Path(*mod.split("."))
    return (SRC.parent / rel).with_suffix(".py").exists() or (SRC.parent / rel / "__init__.py").exists()


def check(mod: str, is_pkg: bool, tree: ast.AST, label: str) -> dict:
    """{(rule, module, what): where} for one module."""
    out = {}
    mine = area(mod)
    for target, names, line in imports(mod, is_pkg, tree):
        top = target.split(".")[0]
        where = f"{label}:{line}"
        if top == "pbft" and is_module(target):
            theirs = area(target)
            if mine is not None and theirs is not None and mine != theirs \
                    and RANK.get(theirs, 99) > RANK.get(mine, -1):
                out[("down", mod, target)] = where
            if mine is not None and target == "pbft":
                out[("down", mod, target)] = where  # the package facade is for users, not for modules
            for n in names:
                if n.startswith("_") and not n.startswith("__") and not is_module(f"{target}.{n}"):
                    out[("private", mod, f"{target}.{n}")] = where
        if mine in PURE and top in IMPURE_MODULES:
            out[("pure", mod, top)] = where
        if top in TOOLS_ONLY and mine != "tools":
            out[("tools-only", mod, top)] = where
    return out


def violations() -> dict:
    out = {}
    for mod, is_pkg, path in modules():
        out.update(check(mod, is_pkg, ast.parse(path.read_text(), str(path)), str(path.relative_to(SRC.parent))))
    return out


def test_every_module_has_a_layer():
    for mod, _, _ in modules():
        a = area(mod)
        assert a is None or a in RANK, f"{mod}: add {a!r} to a layer of LAYERS"


def test_imports_point_down_and_stay_in_their_place():
    new = {k: v for k, v in violations().items() if not allowed(k)}
    assert not new, "layering violations:\n" + "\n".join(f"  {k[0]}: {k[1]} imports {k[2]} ({v})"
                                                        for k, v in sorted(new.items()))


def test_the_allow_list_only_shrinks():
    found = violations()
    stale = [prefix for prefix, (rules, _) in ALLOWED.items()
             if not any(k[1].startswith(prefix) and k[0] in rules for k in found)]
    assert not stale, f"no longer needed, remove from ALLOWED: {stale}"


def test_the_checker_sees_each_kind_of_violation():
    """Negative control: a made-up core module breaking every rule once."""
    src = ("import os\nimport argparse\nfrom ..runtime.node import run_replica\n"
           "def f():\n    from ..codec import _unpack\n    from .. import Client\n")
    got = check("pbft.core.fake", False, ast.parse(src), "fake.py")
    assert set(got) == {("pure", "pbft.core.fake", "os"), ("tools-only", "pbft.core.fake", "argparse"),
                        ("down", "pbft.core.fake", "pbft.runtime.node"),
                        ("private", "pbft.core.fake", "pbft.codec._unpack"), ("down", "pbft.core.fake", "pbft")}
    assert check("pbft.tools.fake", False, ast.parse("import subprocess\nfrom ..runtime import node\n"),
                 "fake.py") == {}
    assert set(check("pbft.state.fake", False, ast.parse("from ..storage import MemStore\nimport lmdb\n"),
                     "fake.py")) == {("down", "pbft.state.fake", "pbft.storage"), ("pure", "pbft.state.fake", "lmdb")}


# Tag numbers compared in core/ (another work area, being rewritten): to become Tag members.
TAG_NUMBERS_ALLOWED: set[str] = set()


def tag_numbers(tree: ast.AST) -> list[int]:
    """Lines comparing something called ``tag`` (a name or an attribute) with an int literal."""
    def is_tag(x):
        return (isinstance(x, ast.Name) and x.id == "tag") or (isinstance(x, ast.Attribute) and x.attr == "tag")

    def is_number(x):
        if isinstance(x, (ast.Tuple, ast.Set, ast.List)):
            return any(is_number(e) for e in x.elts)
        return isinstance(x, ast.Constant) and type(x.value) is int

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(is_tag(x) for x in sides) and any(is_number(x) for x in sides):
                lines.append(node.lineno)
    return lines


def test_tag_numbers_are_written_only_in_messages():
    found = {}
    for mod, _, path in modules():
        if mod != "pbft.messages":
            lines = tag_numbers(ast.parse(path.read_text()))
            if lines:
                found[mod] = lines
    new = {m: v for m, v in found.items() if m not in TAG_NUMBERS_ALLOWED}
    assert not new, f"compare with messages.Tag members, not numbers: {new}"
    stale = TAG_NUMBERS_ALLOWED - set(found)
    assert not stale, f"no longer needed, remove from TAG_NUMBERS_ALLOWED: {stale}"
    assert tag_numbers(ast.parse("if fr.tag != 2 or tag in (3, 4): pass")) == [1, 1]  # the check sees them
    assert tag_numbers(ast.parse("if fr.tag != Tag.REPLY: pass")) == []
