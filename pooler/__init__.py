"""pooler: a PgBouncer-style PostgreSQL gateway that governs what AI agents may do."""

__version__ = "0.1.0"
