"""Saxplane admin server: the cell's source of truth, leader lease and reconciler.

The admin is a peer of the other parts: the rules they share live in :mod:`common`.
"""
