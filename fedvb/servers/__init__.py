"""Flower servers of fedvb (filled by the end-to-end issue)."""
