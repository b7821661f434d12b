"""DVC stages, each run as ``python -m pipeline.stages.<name>``."""
