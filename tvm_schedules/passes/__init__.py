"""Relax rewrite passes, one per file."""
