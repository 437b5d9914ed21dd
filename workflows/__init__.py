"""Workflows: deterministic decisions only; all I/O lives in activities/."""
