"""What the output verification costs per instance header.

Builds headers of the kinds a slide study holds (a pyramid level with the
full specimen module, a sparse level with per-frame positions, an SR) from
``gateway.synthetic``, then times, per header: harvesting the input's
identifying values, building the scanner, and scanning the de-identified
output. Prints milliseconds per header (median of the repeats) beside the
whole de-identification for scale, writes JSON to benchmarks/results/, and
exits 1 when the scan costs 10 ms or more per header.

    python3 -m benchmarks.scan_cost [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from gateway.deid import Deidentifier, SecretKey, load_profile
from gateway.deid.harvest import harvest
from gateway.deid.verify import OutputScanner
from gateway.synthetic import PlantedPHI, write_slide, write_sr

TARGET_MS = 10.0
RESULTS = Path(__file__).resolve().parent / "results"


def headers(folder: Path) -> dict[str, Dataset]:
    """One header of each kind, read without pixel data."""
    phi = PlantedPHI.create(seed=7)
    files = write_slide(folder / "slide", phi, levels=2, sparse_level=0, label=False, overview=False)
    report = write_sr(folder / "sr.dcm", phi, files[0])
    return {
        "sparse level (per-frame positions)": pydicom.dcmread(files[0], stop_before_pixels=True),
        "pyramid level": pydicom.dcmread(files[-1], stop_before_pixels=True),
        "comprehensive SR": pydicom.dcmread(report, stop_before_pixels=True),
    }


def _ms(action: object, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()  # type: ignore[operator]
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def measure(repeats: int) -> list[dict[str, object]]:
    """Milliseconds per header for the scan and for the whole de-identification."""
    engine = Deidentifier(load_profile("research"), SecretKey(b"scan-cost-benchmark-key-0123456789ab"))
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, header in headers(Path(tmp)).items():
            output = copy.deepcopy(header)
            report = engine.deidentify(output, has_pixels=True)
            found = harvest(header)
            uids = set(found.uids)

            def scan(header: Dataset = header, output: Dataset = output, uids: set[str] = uids) -> None:
                OutputScanner(harvest(header), uids).scan(output)

            def whole(header: Dataset = header) -> None:
                engine.deidentify(copy.deepcopy(header), has_pixels=True)

            elements = sum(1 for _ in header.iterall())
            rows.append(
                {
                    "header": kind,
                    "elements": elements,
                    "outcome": report.outcome.value,
                    "scan_ms": round(_ms(scan, repeats), 3),
                    "deidentify_ms": round(_ms(whole, repeats), 3),
                }
            )
    return rows


def main() -> int:
    """Run the measurement, print the table, write JSON; 1 when over target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rows = measure(args.repeats)
    print(f"{'header':<36} {'elements':>8} {'scan ms':>8} {'deid ms':>8}")
    for row in rows:
        print(f"{row['header']:<36} {row['elements']:>8} {row['scan_ms']:>8} {row['deidentify_ms']:>8}")
    worst = max(float(str(row["scan_ms"])) for row in rows)
    verdict = "met" if worst < TARGET_MS else "MISSED"
    print(f"scan target < {TARGET_MS} ms per header: {verdict} (worst {worst} ms)")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    (RESULTS / f"scan-cost-{stamp}.json").write_text(
        json.dumps({"target_ms": TARGET_MS, "rows": rows}, indent=2) + "\n", encoding="utf-8"
    )
    return 0 if worst < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
