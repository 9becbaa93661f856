"""De-identify files in a process of its own and report the time and peak memory as JSON.

Run as ``python -m benchmarks.deid_worker KEY_FILE OUTPUT_DIR FILE...``. The
profile is compiled and the first file de-identified once before the clock
starts: that first call loads the IOD tables, which a running gateway does once
per process. ``maxrss_kib`` is the process's peak resident set
(``ru_maxrss``), imports, tables and compiled profile included.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path

from gateway.deid import Deidentifier, load_key, load_profile


def main(argv: list[str]) -> int:
    key_file, output, *files = argv
    deid = Deidentifier(load_profile("research"), load_key(Path(key_file)))
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    warm_up = out_dir / "warm-up.dcm"
    deid.deidentify_file(Path(files[0]), warm_up)
    warm_up.unlink(missing_ok=True)
    outcomes: Counter[str] = Counter()
    started = time.perf_counter()
    for index, name in enumerate(files):
        report = deid.deidentify_file(Path(name), out_dir / f"{index}.dcm")
        outcomes[report.outcome.value] += 1
    seconds = time.perf_counter() - started
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "maxrss_kib": maxrss, "outcomes": dict(outcomes)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
