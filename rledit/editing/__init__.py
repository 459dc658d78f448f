"""Factored updates: their type, functional application, and the ledger of committed updates."""
