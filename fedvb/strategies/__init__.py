"""Flower strategies of fedvb (filled by the end-to-end issue)."""
