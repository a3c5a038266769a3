"""Example services built on the public ``pbft`` API (see docs/client.md)."""
