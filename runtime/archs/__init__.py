"""Per-architecture runtime modules (the registry keyed by the manifest's model_type is owned by h15)."""
