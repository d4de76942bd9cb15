"""e2edet.utils."""
