"""Integrations with training frameworks (optional extras): `gradalign.integrations.lightning`."""
