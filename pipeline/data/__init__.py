"""Data sources, the canonical sample table and the in-memory batch loader."""
