"""Saxplane admin server: the cell's source of truth, leader lease and reconciler.

Importing this package is cheap: it pulls in no web framework or database
driver, so other parts may import :mod:`admin_server.naming` freely.
"""
