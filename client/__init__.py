"""Saxplane client library: admin calls, model routing and data calls, and `saxutil`."""
