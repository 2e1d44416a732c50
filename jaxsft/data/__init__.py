"""Data: row formats, sources, and the batching pipeline."""
