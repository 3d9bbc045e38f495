"""The one exception type users see: a clear one-line message, never a traceback."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeerdistillError(Exception):
    """A user-facing error: bad config, missing dataset, incompatible method/model, ...

    The CLI prints ``error: <message>`` and exits with status 2.
    """


def nearest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean: a, b?)"`` for the closest valid names, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""
