"""Freed heap memory goes back to the system where the C library can do it, and nothing breaks where it cannot."""

from __future__ import annotations

import platform
import sys

import pytest

from rledit import heap


@pytest.fixture(autouse=True)
def _fresh_lookup():
    heap._malloc_trim.cache_clear()
    yield
    heap._malloc_trim.cache_clear()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_the_heap_is_trimmed_on_glibc():
    assert heap.release_free_heap() is True


def test_elsewhere_it_does_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert heap.release_free_heap() is False
