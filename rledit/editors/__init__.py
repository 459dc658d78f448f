"""Editors: turn captured factors of an edit batch into factored weight updates (normalizer, hypernetworks, methods)."""
