"""What a statement means, read as PostgreSQL reads it: pure functions over SQL text (pglast).

- ``lexing``: whether the gateway can read a session's SQL as the server will (encodings,
  standard_conforming_strings) and how to decode it;
- ``analyzer``: SQL text -> ``StatementFacts`` (tables, columns, functions, writes, COPY, SET,
  PREPARE/EXECUTE, ...), what the rules judge;
- ``lineage``: which base columns each output column of a statement comes from, what masking
  follows.

Nothing here knows rules, masks or sockets; ``policy/`` and ``masking/`` build on it.
"""
