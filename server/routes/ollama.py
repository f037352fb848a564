"""Placeholder: filled in by the ollama dialect work."""

from __future__ import annotations

from starlette.routing import Route

routes: list[Route] = []
