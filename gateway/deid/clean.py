"""The Clean action (C) for free text: remove identifying values found inside.

Values come from two places: what this very instance says about itself
(harvested before any change) and the regular expressions a profile adds
(e.g. any date or long number, whatever instance it belongs to).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from gateway.deid.harvest import IdentifyingValues

#: What replaces a removed value inside text.
REDACTED = "[REMOVED]"


class TextCleaner:
    """Remove harvested values and profile patterns from text, case-insensitively."""

    def __init__(self, found: IdentifyingValues, patterns: Iterable[re.Pattern[str]]) -> None:
        values = sorted(found.text_values(), key=len, reverse=True)
        parts = [_loose(v) for v in values]
        self._values = re.compile("|".join(parts), re.IGNORECASE) if parts else None
        self._patterns = tuple(patterns)

    def clean(self, text: str) -> str:
        """Return ``text`` with every identifying value replaced by ``[REMOVED]``."""
        if self._values is not None:
            text = self._values.sub(REDACTED, text)
        for pattern in self._patterns:
            text = pattern.sub(REDACTED, text)
        return text


def _loose(value: str) -> str:
    """A pattern for ``value`` that tolerates changed spacing and DICOM's ``^``
    between name components (``DOE^JOHN`` also matches ``DOE JOHN``)."""
    tokens = [t for t in re.split(r"[\s^]+", value) if t]
    body = r"[\s^,]+".join(re.escape(t) for t in tokens)
    # Word boundaries only where the value starts or ends with a word character,
    # so short components do not match inside unrelated longer words.
    start = r"(?<!\w)" if value[:1].isalnum() else ""
    end = r"(?!\w)" if value[-1:].isalnum() else ""
    return start + body + end
