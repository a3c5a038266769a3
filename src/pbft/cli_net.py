"""Kept for callers of the old path: the networked commands are ``pbft.tools.net``."""

from .tools.net import _status_notes, fetch_status, load_service, run_guarded

__all__ = ["_status_notes", "fetch_status", "load_service", "run_guarded"]
