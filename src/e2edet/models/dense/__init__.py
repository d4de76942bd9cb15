"""e2edet.models.dense."""
