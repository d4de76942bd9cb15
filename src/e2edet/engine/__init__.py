"""e2edet.engine."""
