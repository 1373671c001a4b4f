"""Integrations with training frameworks (optional extras): `gradalign.integrations.lightning`,
`gradalign.integrations.transformers` (the Hugging Face Trainer)."""
