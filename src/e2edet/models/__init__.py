"""e2edet.models."""
