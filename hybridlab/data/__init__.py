"""Data: tokenizers, corpora and synthetic proxy tasks, all offline and seeded."""
