"""Masking of PostgreSQL result values (see :mod:`pooler.masking.methods`)."""
