"""Notes to the user on stderr, each said once per process: any layer may say one."""
from __future__ import annotations

import sys

_NOTED: set[str] = set()


def note_once(message: str) -> None:
    """Print ``note: <message>`` on stderr the first time this process sees ``message``."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"note: {message}", file=sys.stderr)
