"""Date shifting for the Retain Longitudinal Temporal Information with
Modified Dates option.

Every DA and DT value of one patient moves by the same whole number of days,
derived from the key and the patient, so intervals between a patient's dates
survive and times of day and DT time-zone offsets are kept as they were.
"""

from __future__ import annotations

import re
from datetime import date, timedelta

from gateway.deid.keys import SecretKey

_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?([^+-]*)([+-]\d{4})?$")


class DateShifter:
    """Per-patient keyed offsets within ``[min_days, max_days]`` (0 excluded)."""

    def __init__(self, key: SecretKey, min_days: int, max_days: int) -> None:
        if min_days > max_days:
            raise ValueError("date shift: min_days is greater than max_days")
        if min_days == max_days == 0:
            raise ValueError("date shift: a range of only 0 days would not modify dates")
        self._key = key
        self._min = min_days
        self._span = max_days - min_days + 1

    def offset_days(self, patient_key: str) -> int:
        """The offset for one patient; never 0, so no date is left as it was."""
        value = int.from_bytes(self._key.digest("date-offset", patient_key)[:8], "big")
        for attempt in range(self._span + 1):
            days = self._min + (value + attempt) % self._span
            if days != 0:
                return days
        raise AssertionError("unreachable: the range holds a non-zero day")

    @staticmethod
    def shift_da(value: str, days: int) -> str | None:
        """Shift one DA value (YYYYMMDD); ``None`` when it is not a valid date."""
        text = value.strip()
        if len(text) != 8 or not text.isdigit():
            return None
        try:
            shifted = date(int(text[:4]), int(text[4:6]), int(text[6:])) + timedelta(days=days)
        except (ValueError, OverflowError):
            return None
        return shifted.strftime("%Y%m%d")

    @staticmethod
    def shift_dt(value: str, days: int) -> str | None:
        """Shift one DT value, keeping its precision, time and UTC offset.

        A value given only to the year or month is shifted from its first day
        and written back at the same precision.
        """
        match = _DT.match(value.strip())
        if match is None:
            return None
        year, month, day, rest, tz = match.groups()
        if day is not None and month is None:
            return None
        try:
            start = date(int(year), int(month or 1), int(day or 1))
            shifted = start + timedelta(days=days)
        except (ValueError, OverflowError):
            return None
        out = f"{shifted.year:04d}"
        if month is not None:
            out += f"{shifted.month:02d}"
        if day is not None:
            out += f"{shifted.day:02d}"
        if rest and not re.fullmatch(r"\d{0,6}(\.\d{1,6})?", rest):
            return None
        return out + (rest or "") + (tz or "")
