"""Printed-text detection with the tesseract command-line tool.

Tesseract is an optional dependency (Debian package ``tesseract-ocr``). It is
called as a subprocess so that the gateway needs no Python binding and so that
a missing binary is detected at the call, where the caller can fail closed.

The words found are returned to the caller for a decision and are never
logged here: on a slide label they can be a patient's name.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image, ImageOps

#: Page segmentation mode 11, "sparse text": find as much text as possible in
#: no particular order. A slide overview has a few short lines on a label next
#: to tissue, not a page layout, and the block modes miss isolated words.
PAGE_SEGMENTATION_MODE = 11

#: Images whose long side is at most this many pixels are upscaled twice before
#: recognition: tesseract is tuned for glyphs about 20-30 pixels high, and the
#: print on a label in an overview is often smaller than that.
UPSCALE_LIMIT = 2500

#: Each run gets its own wall-clock limit so that a hung process cannot stall
#: the pipeline.
TIMEOUT_SECONDS = 60.0


class OcrUnavailableError(RuntimeError):
    """The tesseract binary cannot be started."""


class OcrFailedError(RuntimeError):
    """Tesseract started but did not produce a readable result."""


@dataclass(frozen=True, slots=True)
class OcrWord:
    """One word as tesseract reports it.

    ``text`` may be an identifier read off a label: keep it out of logs,
    reasons and reports.
    """

    text: str
    confidence: float
    rotation: int


def prepare(image: Image.Image) -> Image.Image:
    """Grayscale, stretch the contrast and upscale small images for tesseract."""
    gray = ImageOps.autocontrast(image.convert("L"))
    if max(gray.size) <= UPSCALE_LIMIT:
        gray = gray.resize((gray.width * 2, gray.height * 2), Image.Resampling.LANCZOS)
    return gray


def read_words(
    image: Image.Image,
    *,
    tesseract_cmd: str = "tesseract",
    rotations: Iterable[int] = (0,),
) -> list[OcrWord]:
    """Return the words tesseract finds in ``image`` at each rotation (degrees).

    Labels are printed in any direction relative to the overview's pixel grid,
    and tesseract reads only upright lines in this mode, so callers that look
    for any text pass all four right-angle rotations.

    Raises :class:`OcrUnavailableError` when the binary cannot be run and
    :class:`OcrFailedError` when it exits with an error or times out.
    """
    prepared = prepare(image)
    # One thread per run: tesseract's OpenMP threads slow down badly when the
    # gateway runs several instances at once.
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    words: list[OcrWord] = []
    for rotation in rotations:
        buffer = io.BytesIO()
        prepared.rotate(rotation, expand=True, fillcolor=255).save(buffer, format="PNG")
        command = [
            tesseract_cmd,
            "stdin",
            "stdout",
            "-l",
            "eng",
            "--psm",
            str(PAGE_SEGMENTATION_MODE),
            "tsv",
        ]
        try:
            completed = subprocess.run(
                command,
                input=buffer.getvalue(),
                capture_output=True,
                timeout=TIMEOUT_SECONDS,
                env=env,
                check=False,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise OcrUnavailableError(f"cannot run {tesseract_cmd!r}") from exc
        except subprocess.TimeoutExpired as exc:
            raise OcrFailedError(f"tesseract timed out after {TIMEOUT_SECONDS:.0f} s") from exc
        if completed.returncode != 0:
            raise OcrFailedError(f"tesseract exited with status {completed.returncode}")
        words.extend(_parse_tsv(completed.stdout.decode("utf-8", "replace"), rotation))
    return words


def _parse_tsv(tsv: str, rotation: int) -> list[OcrWord]:
    reader = csv.DictReader(io.StringIO(tsv), delimiter="\t", quoting=csv.QUOTE_NONE)
    if reader.fieldnames is None or not {"text", "conf"} <= set(reader.fieldnames):
        raise OcrFailedError("tesseract output is not TSV")
    words: list[OcrWord] = []
    for row in reader:
        text = (row["text"] or "").strip()
        if not text:
            continue
        try:
            confidence = float(row["conf"])
        except (TypeError, ValueError) as exc:
            raise OcrFailedError("tesseract output has a malformed confidence") from exc
        words.append(OcrWord(text=text, confidence=confidence, rotation=rotation))
    return words
