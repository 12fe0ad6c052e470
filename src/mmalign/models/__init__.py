"""VLM loading, tiny-model builders, per-architecture quirks, freezing and LoRA."""
