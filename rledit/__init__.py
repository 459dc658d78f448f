"""rledit: lifelong knowledge editing of causal language models with hypernetwork editors."""

__version__ = "0.1.0"
