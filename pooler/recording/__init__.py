"""Session recordings: what agents asked, what the gateway decided, what they were shown.

Pure parts (no asyncio, no gateway): ``format`` (records, the hash chain), ``files`` (names,
rotation and retention decisions, reading compressed files), ``reader`` (records back as plain
dicts), ``verify`` (the chain checked). ``writer`` is the thread that writes chunks; the
gateway's observer that turns events into records is ``pooler/gateway/recorder.py``.
The file format is described in docs/recordings.md.
"""
