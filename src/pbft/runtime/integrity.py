"""The code a replica runs, checked against the cluster file at every start (so at every
recovery reboot, which is a start).

``package_sha256()`` hashes every ``.py`` file of the ``pbft`` package being run, in the order
of their paths relative to the package directory, each as ``path NUL size NUL content``.
``pbft init`` records it in ``cluster.toml``::

    [integrity]
    package_sha256 = "..."

and ``pbft replica`` refuses to start when the package it runs from hashes otherwise
(``check``). After an upgrade: ``pbft integrity DIR --update``. Without the section nothing is
checked. What this does and does not protect against: ``docs/recovery.md``.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Optional

from ..config import ConfigError

SECTION = "integrity"
KEY = "package_sha256"
_LINE = re.compile(r'^\s*package_sha256\s*=.*$', re.M)
_HEX = re.compile(r"^[0-9a-f]{64}$")


def package_dir() -> Path:
    """The directory of the ``pbft`` package this process imported (this module's parent's
    parent: ``pbft/runtime/integrity.py``)."""
    return Path(__file__).resolve().parent.parent


def package_sha256(root: Optional[Path] = None) -> str:
    root = Path(root) if root is not None else package_dir()
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py"), key=lambda q: q.relative_to(root).as_posix()):
        if "__pycache__" in p.parts:
            continue
        data = p.read_bytes()
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def recorded(directory: Path) -> Optional[str]:
    """The hash ``cluster.toml`` records, or None if it has no ``[integrity]`` section."""
    path = Path(directory) / "cluster.toml"
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    t = doc.get(SECTION)
    if t is None:
        return None
    if not isinstance(t, dict) or set(t) - {KEY}:
        raise ConfigError(f"{path}: [integrity] holds only {KEY} = \"<64 hex digits>\"")
    v = t.get(KEY)
    if v is None:
        return None
    if not isinstance(v, str) or not _HEX.match(v):
        raise ConfigError(f"{path}: [integrity] {KEY} must be 64 lowercase hex digits, got {v!r}")
    return v


def check(directory: Path) -> Optional[str]:
    """Raise ``ConfigError`` if the running package does not hash as ``cluster.toml`` says;
    return the hash checked (None: nothing recorded, nothing checked)."""
    want = recorded(directory)
    if want is None:
        return None
    got = package_sha256()
    if got != want:
        raise ConfigError(f"the pbft package in {package_dir()} hashes to {got[:16]}..., but "
                          f"{Path(directory) / 'cluster.toml'} [integrity] {KEY} says {want[:16]}...: "
                          f"the code was changed; refusing to start (after a deliberate upgrade: "
                          f"`pbft integrity {directory} --update`)")
    return got


def record(directory: Path, value: Optional[str] = None) -> str:
    """Write ``[integrity] package_sha256`` (the running package's hash by default) into
    ``cluster.toml``, replacing the one there."""
    value = value or package_sha256()
    path = Path(directory) / "cluster.toml"
    text = path.read_text()
    recorded(directory)  # (refuses a malformed section rather than adding a second one)
    if _LINE.search(text):
        text = _LINE.sub(f'{KEY} = "{value}"', text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n# the code replicas may run: docs/recovery.md\n" \
            + f'[{SECTION}]\n{KEY} = "{value}"\n'
    path.write_text(text)
    return value
