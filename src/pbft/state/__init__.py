"""Replica state: application objects and durable storage."""
