"""Logging: output formats, bound fields, and the PHI guard on every path."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from gateway import logs, metrics
from tests.logcapture import captured_logs

WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"

#: Values shaped like the identifiers a dataset carries: a person name, a long
#: patient ID, an instance UID, free text with a date.
PLANTED = [
    "DOE^JANE^Q",
    "PAT-7734-XYZ-000123",
    "1.2.826.0.1.3680043.99.12345.678",
    "Jane Q. Doe, born 1965-04-12",
]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    metrics.register_destinations(["PACS_A"])
    with captured_logs() as stream:
        yield stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_association_instance_outcome_and_timings(out: io.StringIO) -> None:
    log = logs.instance_logger(
        logs.association_logger(17, "SCANNER_1", called_ae="DEID_GW"), WSI, image_type="VOLUME"
    )
    log.info(
        "instance.forwarded",
        outcome="success",
        destination="PACS_A",
        deidentify_seconds=0.25,
        forward_seconds=1.5,
        size_bytes=1024,
        reason="retries-exhausted",
        transfer_syntax="1.2.840.10008.1.2.4.50",
        input_sha256="ab" * 32,
    )
    [line] = lines(out)
    assert line["event"] == "instance.forwarded"
    assert line["level"] == "info"
    assert line["assoc_id"] == 17
    assert line["calling_ae"] == "SCANNER_1"
    assert line["called_ae"] == "DEID_GW"
    assert line["sop_class"] == "VLWholeSlideMicroscopyImageStorage"
    assert line["image_type"] == "VOLUME"
    assert line["outcome"] == "success"
    assert line["destination"] == "PACS_A"
    assert line["deidentify_seconds"] == 0.25
    assert line["forward_seconds"] == 1.5
    assert line["size_bytes"] == 1024
    assert line["reason"] == "retries-exhausted"
    assert line["transfer_syntax"] == "1.2.840.10008.1.2.4.50"
    assert "timestamp" in line
    assert "redacted_fields" not in line


def test_console_format_on_a_terminal() -> None:
    stream = Terminal()
    try:
        logs.configure_logging(stream, capture_stdlib=False)
        logs.get_logger(calling_ae="SCANNER_1").info("association.accepted")
    finally:
        structlog.reset_defaults()
    text = stream.getvalue()
    assert "association.accepted" in text and "SCANNER_1" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_unknown_keys_are_dropped_and_bad_values_replaced(out: io.StringIO) -> None:
    logs.get_logger().info(
        "instance.received", patient_name="x", outcome="maybe", size_bytes=-1, retry="yes"
    )
    [line] = lines(out)
    assert "patient_name" not in line
    assert line["redacted_fields"] == 1
    assert line["outcome"] == logs.MARKER
    assert line["size_bytes"] == logs.MARKER
    assert line["retry"] == logs.MARKER


@pytest.mark.parametrize("planted", PLANTED)
def test_a_planted_value_never_reaches_the_output(out: io.StringIO, planted: str) -> None:
    log = logs.get_logger()
    keys = [k for k in logs.FIELD_RULES if k != "event"]  # the event is the message, below
    keys += ["patient_name", "detail", "path", "uid_map", "message"]
    for key in keys:
        log.info("instance.received", **{key: planted})
        log.info("instance.received", **{key: [planted]})
        log.bind(**{key: planted}).warning("instance.quarantined")
    log.info(planted)
    log.info("instance.received", **{planted: 1})
    structlog.contextvars.bind_contextvars(patient_id=planted, calling_ae=planted)
    log.info("association.accepted")
    structlog.contextvars.clear_contextvars()
    logs.instance_logger(logs.get_logger(), planted, image_type=planted).info("instance.received")
    try:
        raise ValueError(f"cannot parse {planted}")
    except ValueError:
        log.exception("instance.unreadable")
        log.error("instance.unreadable", exc_info=True)
        logging.getLogger("pynetdicom.dsutils").exception("Failed to decode %s", planted)
    logging.getLogger("pynetdicom").warning("Received store request for %s", planted)
    logging.getLogger("pynetdicom").warning(planted)

    text = out.getvalue()
    assert text.count("\n") == 3 * len(keys) + 9
    assert planted not in text
    for fragment in planted.replace("^", " ").replace(",", " ").split():
        if len(fragment) >= 4:
            assert fragment not in text, fragment


def test_exceptions_keep_only_their_type_and_place(out: io.StringIO) -> None:
    def parse() -> None:
        raise KeyError("DOE^JANE")

    try:
        parse()
    except KeyError:
        logs.get_logger().exception("instance.unreadable")
    [line] = lines(out)
    assert line["error_type"] == "KeyError"
    assert str(line["error_where"]).startswith("test_logs.py:")
    assert "exception" not in line and "exc_info" not in line


def test_records_of_other_libraries_keep_logger_and_level_only(out: io.StringIO) -> None:
    logging.getLogger("pynetdicom.assoc").warning("Association Aborted")
    [line] = lines(out)
    assert line == {
        "event": logs.MARKER,
        "level": "warning",
        "logger": "pynetdicom.assoc",
        "timestamp": line["timestamp"],
    }


def test_level_filters_debug(out: io.StringIO) -> None:
    logs.get_logger().debug("instance.received")
    logging.getLogger("pynetdicom").debug("dataset dump")
    assert out.getvalue() == ""
