"""The error of untrusted input that does not decode (``DecodeError``), in a module of its own.

It is raised and caught by the pure layers (``pbft.codec`` re-exports it: callers import it from
there) and subclassed by interpreted code (``runtime.signer.SignerError``). This module is never
compiled by ``make native``: a class compiled by mypyc accepts no subclass defined outside the
compiled modules (its ``__init__`` refuses an instance of one), and the codec's callers must catch
the signer's refusals as the same ``DecodeError``.
"""

from __future__ import annotations


class DecodeError(Exception):
    """Untrusted input that is not a well-formed message; ``reason`` is a short metric label."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
