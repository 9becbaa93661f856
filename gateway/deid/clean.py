"""The Clean action (C) for free text.

Three passes, most specific first:

1. identifying values this very instance carries (names and their
   components, IDs, accession numbers, container and specimen identifiers,
   dates in their common written forms), harvested before any change;
2. the regular expressions the profile adds (any date, long numbers, e-mail
   addresses, whatever instance they belong to);
3. an allowlist of words: every word left must be one the cleaner knows to
   be descriptive, that is a word of the meaning of a code in the DICOM
   content mapping resource (SNOMED CT, DCM and the other coding schemes
   pydicom ships: about 8,800 words of pathology, anatomy and procedure, and
   no given names or surnames), a word the profile adds, or an inflected
   form of one (``stained``, ``sections``), or a token of at most two
   letters. Any other word is removed, since it may be a name.

Text of which no known word is left is reported as not cleanable, and the
caller empties the element as its Type allows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache

from pydicom.sr._concepts_dict import concepts

from gateway.deid.harvest import IdentifyingValues

#: What replaces a removed value inside text.
REDACTED = "[REMOVED]"
_MARK = "\x00"  # stands for REDACTED while cleaning; no word pattern matches it
_WORD = re.compile(r"[^\W\d_]+")
_SHORT = 2


@cache
def coded_vocabulary() -> frozenset[str]:
    """Lower-case words of every code meaning in pydicom's concept dictionary."""
    words: set[str] = set()
    for scheme in concepts.values():
        for entries in scheme.values():
            for meaning, _groups in entries.values():  # type: ignore[attr-defined]
                words.update(w.lower() for w in _WORD.findall(meaning))
    return frozenset(words)


class TextCleaner:
    """Clean text for one instance; see the module documentation."""

    def __init__(
        self,
        found: IdentifyingValues,
        patterns: Iterable[re.Pattern[str]],
        extra_words: Iterable[str] = (),
    ) -> None:
        values = sorted(found.text_values(), key=len, reverse=True)
        parts = [_loose(v) for v in values]
        self._values = re.compile("|".join(parts), re.IGNORECASE) if parts else None
        self._patterns = tuple(patterns)
        self._vocabulary = coded_vocabulary() | {w.lower() for w in extra_words}

    def _known(self, word: str) -> bool:
        return any(stem in self._vocabulary for stem in _stems(word))

    def clean(self, text: str) -> str | None:
        """Return the cleaned text, or ``None`` when no known word is left."""
        if self._values is not None:
            text = self._values.sub(_MARK, text)
        for pattern in self._patterns:
            text = pattern.sub(_MARK, text)
        known = 0

        def word(match: re.Match[str]) -> str:
            nonlocal known
            token = match.group(0)
            if len(token) <= _SHORT or self._known(token.lower()):
                known += 1
                return token
            return _MARK

        text = _WORD.sub(word, text)
        if _MARK in text:
            if not known:
                return None
            text = re.sub(f"{_MARK}+", REDACTED, text)
        return text


_SUFFIXES = ("s", "es", "ed", "d", "ing", "ly")


def _stems(word: str) -> Iterable[str]:
    """The word and its forms without a common English inflection."""
    yield word
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            stem = word[: -len(suffix)]
            yield stem
            yield stem + "e"
            if len(stem) > 3 and stem[-1] == stem[-2]:
                yield stem[:-1]  # embedded -> embed


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
