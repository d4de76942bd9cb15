"""e2edet.losses."""
