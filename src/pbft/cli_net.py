"""Kept for callers of the old path: the networked commands are ``pbft.tools.net``."""

from .tools.net import fetch_status, load_service, run_guarded, status_notes

_status_notes = status_notes  # its old name

__all__ = ["fetch_status", "load_service", "run_guarded", "status_notes"]
