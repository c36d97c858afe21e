"""Saxplane HTTP frontend: the Saxml HTTP API and an OpenAI-compatible API over a cell.

Stateless: it finds ready replicas through the admin (client.router), forwards
bodies and streams to them, and answers in the Saxml or OpenAI shapes.
"""
