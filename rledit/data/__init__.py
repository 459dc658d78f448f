"""Edit records, dialect adapters, the synthetic world, tokenization and edit streams."""
