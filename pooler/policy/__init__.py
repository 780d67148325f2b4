"""The policy engine: SQL analysis (analyzer), Starlark rules (rules) and decisions (engine)."""
