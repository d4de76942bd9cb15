"""e2edet.data."""
