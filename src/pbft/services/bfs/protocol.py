"""BFS wire format: operations, results and attributes, shared by the service and its clients.

An operation is a msgpack list ``[op, args..., (uid, gid, groups)]``; names, link targets,
data and xattr names/values are ``bytes``; everything else is an integer (or ``None`` where
an argument is optional).  A result is ``[0, value]`` on success or ``[errno]`` on failure
(Linux errno numbers).

Attributes are the tuple ``(ino, mode, nlink, uid, gid, rdev, size, blocks, atime_ns,
mtime_ns, ctime_ns)``; ``blocks`` counts 512-byte units actually stored.
"""

from __future__ import annotations

import errno

import msgpack

# attribute tuple positions
A_INO, A_MODE, A_NLINK, A_UID, A_GID, A_RDEV, A_SIZE, A_BLOCKS, A_ATIME, A_MTIME, A_CTIME = range(11)

#: operations that never change the state: the only ones accepted with ``read_only=True``
READ_ONLY_OPS = frozenset({"lookup", "getattr", "readlink", "read", "readdir", "statfs", "getxattr", "listxattr",
                           "changes", "open"})

#: number of arguments of each operation (credentials not counted)
ARITY = {
    "lookup": 2,        # parent, name
    "getattr": 1,       # ino
    "readlink": 1,      # ino
    "read": 3,          # ino, offset, size
    "open": 3,          # ino, (size, mtime) the caller has cached or None, max -> (attr, the whole file
                        #   if it changed since, is at most max bytes and the caller may read it, else None)
    "readdir": 3,       # ino, cookie, max_entries  -> (entries, eof, resume cookie); entry (name, cookie, attr)
    "statfs": 0,
    "changes": 1,       # (client ids) -> (last agreed time, latest time another client changed anything)
    "getxattr": 2,      # ino, name
    "listxattr": 1,     # ino
    "create": 4,        # parent, name, mode, exclusive
    "mknod": 4,         # parent, name, mode (with S_IFMT), rdev
    "mkdir": 3,         # parent, name, mode
    "symlink": 3,       # parent, name, target
    "link": 3,          # ino, new parent, new name
    "unlink": 3,        # parent, name, keep  -> (orphaned ino or 0, the agreed time: the parent's mtime)
                        #   keep: hold the inode if this removes its last link: True, False, or only if it
                        #   is one of the inodes in a tuple (those the caller has open; at most KEEP_MAX)
    "rmdir": 2,         # parent, name
    "rename": 6,        # parent, name, new parent, new name, flags, keep (as unlink's) -> (orphaned ino or 0)
    "setattr": 6,       # ino, mode|None, uid|None, gid|None, size|None, (atime, mtime) each None|-1(now)|ns
    "write": 3,         # ino, offset, data -> attr
    "update": 2,        # ino, steps: ((0, offset, data) a write | (1, mode, uid, gid, size, times) a setattr, ...)
                        #   in order, all or none (at most UPDATE_STEPS_MAX, data IO_MAX in all) -> attr
    "setxattr": 4,      # ino, name, value, flags (1 create, 2 replace)
    "removexattr": 2,   # ino, name
    "fsync": 1,         # ino
    "release": 1,       # ino: drop this client's hold on an unlinked inode
    "release_all": 0,   # drop every hold of this client (a mount starting)
}

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
UTIME_NOW = -1

ROOT_INO = 1
NAME_MAX = 255
SYMLINK_MAX = 4095
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 16 * 1024
XATTR_TOTAL_MAX = 32 * 1024
GROUPS_MAX = 32
#: largest payload of one read or write request (leaves room for the headers in 64 KiB)
IO_MAX = 48 * 1024
#: inodes named in the ``keep`` of one unlink or rename
KEEP_MAX = 32
#: steps of one ``update`` (writes and attribute changes of one inode, applied in order)
UPDATE_STEPS_MAX = 16
UPDATE_WRITE, UPDATE_SETATTR = 0, 1


def creds(uid: int, gid: int, groups=()) -> tuple:
    return (uid, gid, tuple(groups)[:GROUPS_MAX])


def encode_op(op: str, *args) -> bytes:
    """``encode_op("lookup", 1, b"name", creds(...))``: the credentials come last."""
    return msgpack.packb([op, *args], use_bin_type=True)


class BFSError(OSError):
    """The service refused an operation: ``.errno`` is the errno it returned."""


def decode_result(raw: bytes):
    """The value of a successful result; raises ``BFSError`` for an errno, ``ValueError`` on garbage."""
    try:
        r = msgpack.unpackb(raw, raw=False, use_list=False)
    except Exception as e:  # msgpack raises several types
        raise ValueError("malformed result") from e
    if not isinstance(r, tuple) or not r or type(r[0]) is not int:
        raise ValueError("malformed result")
    if r[0] != 0:
        raise BFSError(r[0], errno.errorcode.get(r[0], "error"))
    if len(r) != 2:
        raise ValueError("malformed result")
    return r[1]
