"""The engine's hook for OVERVIEW images: redact the slide label in the pixels."""

from __future__ import annotations

from pydicom.dataset import Dataset


def overview_redactor(ocr: bool) -> _Redact:
    """A redactor for the engine: ``redact`` blacks the label out, ``replace``
    paints the research identifiers over it; OCR then checks for text left."""
    return _Redact(ocr)


class _Redact:
    def __init__(self, ocr: bool) -> None:
        self._ocr = ocr

    def __call__(self, dataset: Dataset, mode: str, research_ids: tuple[str, str]) -> str | None:
        # Imported here: image codecs and OCR are loaded only by a gateway
        # whose profile redacts overviews, and only once it meets one.
        from gateway.redact import redact_overview

        result = redact_overview(
            dataset,
            mode="replace" if mode == "replace" else "blackout",
            research_ids=[i for i in research_ids if i],
            ocr=self._ocr,
        )
        return None if result.ok else str(result.reason)
