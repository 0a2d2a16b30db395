"""Test support: the real sandbox as a subprocess, and small helpers."""
