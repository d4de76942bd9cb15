"""e2edet.assign."""
