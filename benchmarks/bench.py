"""Relay throughput and memory of the gateway against dcmtk, measured in one run.

For each workload (one large VOLUME instance, a study of many small ones) the
rounds alternate between:

(a) baseline: dcmtk storescu -> dcmtk storescp (``+B``, 128 KiB PDUs, to disk);
(b) relay: storescu -> gateway (research profile) -> the same kind of storescp,
    from storescu's start until the archive holds every de-identified instance;
(c) acknowledgement: from storescu's start until it has every C-STORE response.

Then a reference floor (a minimal pynetdicom receiver, without and with an
fsync per instance, and through the gateway's pynetdicom changes),
de-identification alone (file to file) against a plain copy (with fsync, so
the durable write speed of the disk), its peak memory on a large instance,
and Orthanc (receive, /anonymize, forward) as a peer. Every figure printed is
measured in the run; the JSON goes to ``benchmarks/results/<timestamp>.json``.
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.floor_scp import AE_TITLE as FLOOR_AE
from benchmarks.peers import (
    STARTUP_SECONDS,
    ClosedFiles,
    Gateway,
    MemoryWatch,
    Orthanc,
    Sender,
    Storescp,
)
from tests.peers import ORTHANC, STORESCU, free_port, stop, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data"
RESULTS = ROOT / "benchmarks" / "results"
MB = 1_000_000
GB = 1_000_000_000
#: Scratch space a run needs beyond its input data: the largest instance lives
#: in the gateway's spool, its work copy, the archive and the baseline archive.
SCRATCH_FACTOR = 4

TARGETS = {
    "large_relay_ratio": 0.4,
    "large_ack_ratio": 0.5,
    "study_relay_ratio": 0.25,
    "study_ack_ratio": 0.3,
    "gateway_peak_rss_mb": 200.0,
    "flatness": 0.10,
    "deid_peak_mb": 150.0,
}


@dataclass
class Plan:
    """Sizes of one run; ``--quick`` shrinks them."""

    large_bytes: int
    huge_bytes: int | None
    deid_bytes: int
    study_count: int
    study_instance_bytes: int
    rounds: int
    orthanc: bool


@dataclass
class Workload:
    name: str
    files: list[Path]
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = sum(p.stat().st_size for p in self.files)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Data


def _volume(target: int) -> Path:
    """A VOLUME instance of about ``target`` bytes with real JPEG tiles, made once."""
    from gateway.synthetic import PlantedPHI, write_large_volume

    path = DATA / f"volume-{target // MB}MB.dcm"
    if not path.is_file():
        log(f"writing {path.name}")
        partial = path.with_name(f".{path.name}.partial")
        write_large_volume(partial, target, PlantedPHI.create(seed=target % 9973))
        partial.replace(path)
    return path


def _study_dir(count: int, target: int) -> Path:
    return DATA / f"study-{count}x{target // 1000}kB"


def _study(count: int, target: int) -> list[Path]:
    """A study of ``count`` VOLUME instances of about ``target`` bytes each, made once.

    One instance is written with the synthetic writer, then copied with a new
    SOP Instance UID and Instance Number per copy: same patient, study and
    series, distinct instances.
    """
    from pydicom import dcmread
    from pydicom.uid import UID

    from gateway.synthetic import PlantedPHI, write_large_volume

    directory = _study_dir(count, target)
    done = directory / ".complete"
    if not done.is_file():
        log(f"writing {directory.name}")
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        phi = PlantedPHI.create(seed=200)
        template = write_large_volume(directory / ".template.dcm", target, phi)
        for index in range(count):
            ds = dcmread(template)
            uid = UID(phi.uid(f"study-instance/{index}"))
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.InstanceNumber = index + 1
            ds.save_as(directory / f"{index:04d}.dcm", enforce_file_format=True)
        template.unlink()
        done.touch()
    return sorted(directory.glob("*.dcm"))


def _key() -> Path:
    from gateway.deid import generate_key_file

    path = DATA / "bench.key"
    if not path.is_file():
        generate_key_file(path)
    return path


def _warm(files: Sequence[Path]) -> None:
    """Read the inputs once so every mode starts from the page cache."""
    for path in files:
        with path.open("rb") as fh:
            while fh.read(16 * 2**20):
                pass


# ---------------------------------------------------------------------------
# Measurements


def _wait(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.005) -> float:
    """Poll ``condition``; return the perf_counter time it first held."""
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if condition():
            return now
        if now > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def _timeout(size: int) -> float:
    return 120 + size / (5 * MB)


def baseline_round(scp: Storescp, work: Workload) -> float:
    sender = Sender(scp.port, work.files, scp.ae_title)
    seconds = sender.join(_timeout(work.size))
    if not scp.holds(len(work.files)):
        raise RuntimeError(f"baseline: storescp holds {len(scp.files())} of {len(work.files)}")
    scp.clear()
    return seconds


def gateway_round(gateway: Gateway, archive: Storescp, work: Workload) -> tuple[float, float]:
    """One relay round; returns (relay seconds, acknowledgement seconds)."""
    count = len(work.files)

    def check() -> None:
        if gateway.quarantined():
            raise RuntimeError("the gateway quarantined an instance; see its log")

    with ClosedFiles(archive.directory) as closed:
        sender = Sender(gateway.port, work.files, "DEID_GATEWAY")
        relay_end = closed.wait(count, _timeout(work.size), check)
    ack = sender.join(_timeout(work.size))
    if not archive.holds(count):
        raise RuntimeError(f"relay: the archive holds {len(archive.files())} of {count}")
    relay = relay_end - sender.started
    _wait(lambda: gateway.pending() == 0, 60, "the spool to empty", 0.05)
    archive.clear()
    return relay, ack


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _rates(work: Workload, seconds: float) -> dict[str, float]:
    return {
        "seconds": seconds,
        "mb_per_s": work.size / MB / seconds,
        "instances_per_s": len(work.files) / seconds,
    }


def relay_benchmark(
    work: Workload, rounds: int, key: Path, baseline: Storescp, archive: Storescp, scratch: Path
) -> dict[str, Any]:
    """Alternate baseline and gateway rounds on a fresh gateway; its peak RSS is this workload's."""
    _warm(work.files)
    gw_dir = scratch / f"gateway-{work.name}"
    gateway = Gateway(gw_dir, key, archive).start()
    assert gateway.proc is not None
    times: dict[str, list[float]] = {"baseline": [], "relay": [], "ack": []}
    try:
        with MemoryWatch(gateway.proc.pid) as memory:
            for index in range(rounds):
                times["baseline"].append(baseline_round(baseline, work))
                relay, ack = gateway_round(gateway, archive, work)
                times["relay"].append(relay)
                times["ack"].append(ack)
                log(
                    f"{work.name} round {index + 1}: baseline {times['baseline'][-1]:.2f} s, "
                    f"relay {relay:.2f} s, ack {ack:.2f} s"
                )
    finally:
        gateway.stop()
    shutil.rmtree(gw_dir, ignore_errors=True)
    medians = {mode: _median(values) for mode, values in times.items()}
    return {
        "bytes": work.size,
        "instances": len(work.files),
        "rounds": times,
        "median": {mode: _rates(work, seconds) for mode, seconds in medians.items()},
        "relay_ratio": medians["baseline"] / medians["relay"],
        "ack_ratio": medians["baseline"] / medians["ack"],
        "gateway_peak_rss_mb": memory.peak_kib * 1024 / MB,
    }


def _deid_worker(key: Path, files: Sequence[Path], output: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.deid_worker", str(key), str(output), *map(str, files)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    shutil.rmtree(output, ignore_errors=True)
    result: dict[str, Any] = json.loads(proc.stdout)
    if set(result["outcomes"]) != {"passed"}:
        raise RuntimeError(f"de-identification did not pass every instance: {result['outcomes']}")
    return result


def _copy(files: Sequence[Path], output: Path) -> float:
    """A plain copy of the same bytes, file to file, flushed to disk like the engine's output."""
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for index, path in enumerate(files):
        target = output / f"{index}.dcm"
        shutil.copyfile(path, target)
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - started
    shutil.rmtree(output, ignore_errors=True)
    return seconds


def deid_benchmark(
    works: Sequence[Workload], memory_file: Path, rounds: int, key: Path, scratch: Path
) -> dict[str, Any]:
    """De-identification file to file against a plain copy, alternating; then peak memory."""
    results: dict[str, Any] = {}
    for work in works:
        _warm(work.files)
        deid: list[float] = []
        copy: list[float] = []
        for _ in range(rounds):
            copy.append(_copy(work.files, scratch / "copy"))
            deid.append(_deid_worker(key, work.files, scratch / "deid")["seconds"])
        results[work.name] = {
            "bytes": work.size,
            "instances": len(work.files),
            "rounds": {"copy": copy, "deid": deid},
            "copy_mb_per_s": work.size / MB / _median(copy),
            "deid_mb_per_s": work.size / MB / _median(deid),
        }
        log(f"deid {work.name}: {results[work.name]['deid_mb_per_s']:.0f} MB/s, "
            f"copy {results[work.name]['copy_mb_per_s']:.0f} MB/s")
    _warm([memory_file])
    peak = _deid_worker(key, [memory_file], scratch / "deid")
    results["memory"] = {
        "bytes": memory_file.stat().st_size,
        "seconds": peak["seconds"],
        "peak_rss_mb": peak["maxrss_kib"] * 1024 / MB,
    }
    log(f"deid peak on {memory_file.name}: {results['memory']['peak_rss_mb']:.0f} MB")
    return results


def orthanc_benchmark(work: Workload, rounds: int, archive: Storescp, scratch: Path) -> dict[str, Any]:
    """Orthanc as the peer: receive the study, /anonymize it, forward it to the archive."""
    phases: dict[str, list[float]] = {"receive": [], "anonymize": [], "forward": [], "total": []}
    count = len(work.files)
    for index in range(rounds):
        directory = scratch / f"orthanc-{index}"
        orthanc = Orthanc(directory, archive).start()
        try:
            sender = Sender(orthanc.port, work.files, "ORTHANC")
            received = sender.started + sender.join(_timeout(work.size))
            studies = orthanc.request("GET", "/studies")
            if len(studies) != 1:
                raise RuntimeError(f"Orthanc holds {len(studies)} studies, expected 1")
            anonymized = orthanc.request("POST", f"/studies/{studies[0]}/anonymize", {})
            done_anonymize = time.perf_counter()
            with ClosedFiles(archive.directory) as closed:
                store = {"Resources": [anonymized["ID"]], "Synchronous": True}
                orthanc.request("POST", "/modalities/archive/store", store)
                forwarded = closed.wait(count, _timeout(work.size), lambda: None)
            if not archive.holds(count):
                raise RuntimeError(f"Orthanc: the archive holds {len(archive.files())} of {count}")
        finally:
            orthanc.stop()
        archive.clear()
        shutil.rmtree(directory, ignore_errors=True)
        phases["receive"].append(received - sender.started)
        phases["anonymize"].append(done_anonymize - received)
        phases["forward"].append(forwarded - done_anonymize)
        phases["total"].append(forwarded - sender.started)
        log(f"orthanc round {index + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in phases.items()))
    return {
        "bytes": work.size,
        "instances": count,
        "rounds": phases,
        "median": {phase: _rates(work, _median(values)) for phase, values in phases.items()},
    }


#: The reference receivers: name -> options of ``benchmarks/floor_scp.py``.
FLOOR_VARIANTS = {
    "no_fsync": [],
    "fsync": ["--fsync"],
    "gateway_pynetdicom_fsync": ["--fsync", "--gateway-pynetdicom"],
}


def floor_benchmark(
    works: Sequence[Workload], rounds: int, baseline: Storescp, scratch: Path
) -> dict[str, Any]:
    """The minimal pynetdicom receiver (``benchmarks/floor_scp.py``) against
    the baseline in alternating rounds, as pynetdicom comes without and with an
    fsync per instance, and through the gateway's pynetdicom changes with it:
    what pynetdicom and a durable write cost before the gateway does anything."""
    results: dict[str, Any] = {}
    for variant, flags in FLOOR_VARIANTS.items():
        directory = scratch / f"floor-{variant}"
        port = free_port()
        command = [sys.executable, "-m", "benchmarks.floor_scp", str(port), str(directory), *flags]
        proc = subprocess.Popen(command, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port, proc, timeout=STARTUP_SECONDS)
            for work in works:
                times: dict[str, list[float]] = {"baseline": [], "ack": []}
                for _ in range(rounds):
                    times["baseline"].append(baseline_round(baseline, work))
                    times["ack"].append(Sender(port, work.files, FLOOR_AE).join(_timeout(work.size)))
                    for path in directory.glob("*.dcm"):
                        path.unlink()
                base, ack = _median(times["baseline"]), _median(times["ack"])
                results.setdefault(work.name, {})[variant] = {
                    "rounds": times, "ack": _rates(work, ack), "ack_ratio": base / ack,
                }
                log(f"floor {work.name} {variant}: baseline {base:.2f} s, ack {ack:.2f} s")
        finally:
            stop(proc)
            shutil.rmtree(directory, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------
# Report


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    relay = results["relay"]
    large, study = relay["large"], relay["study"]
    peaks = [w["gateway_peak_rss_mb"] for w in relay.values()]
    checks = [
        ("large instance relay ratio b/a", large["relay_ratio"], ">=", TARGETS["large_relay_ratio"]),
        ("large instance ack ratio c/a", large["ack_ratio"], ">=", TARGETS["large_ack_ratio"]),
        ("study relay ratio b/a", study["relay_ratio"], ">=", TARGETS["study_relay_ratio"]),
        ("study ack ratio c/a", study["ack_ratio"], ">=", TARGETS["study_ack_ratio"]),
        ("gateway peak RSS (MB)", max(peaks), "<", TARGETS["gateway_peak_rss_mb"]),
        ("deid peak RSS on the memory instance (MB)", results["deid"]["memory"]["peak_rss_mb"], "<",
         TARGETS["deid_peak_mb"]),
    ]
    if "huge" in relay:
        growth = relay["huge"]["gateway_peak_rss_mb"] / large["gateway_peak_rss_mb"] - 1
        checks.append(("gateway peak growth, huge vs large instance", growth, "<=", TARGETS["flatness"]))
    out = []
    for name, value, op, limit in checks:
        ok = value >= limit if op == ">=" else value < limit if op == "<" else value <= limit
        out.append({"target": name, "value": value, "op": op, "limit": limit, "ok": bool(ok)})
    return out


def _table(results: dict[str, Any]) -> str:
    lines = [
        "| workload | size | mode | median s | MB/s | instances/s | ratio to baseline | gateway peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, work in results["relay"].items():
        size = f"{work['instances']} x {work['bytes'] / work['instances'] / MB:.1f} MB"
        for mode, label in (("baseline", "(a) dcmtk -> dcmtk"), ("relay", "(b) relay via gateway"),
                            ("ack", "(c) gateway acknowledged")):
            if mode not in work["median"]:
                continue
            m = work["median"][mode]
            ratio = {"baseline": "1.00", "relay": f"{work.get('relay_ratio', 0):.2f}",
                     "ack": f"{work.get('ack_ratio', 0):.2f}"}[mode]
            peak = f"{work['gateway_peak_rss_mb']:.0f} MB" if mode == "relay" else ""
            lines.append(f"| {name} | {size} | {label} | {m['seconds']:.2f} | {m['mb_per_s']:.0f} | "
                         f"{m['instances_per_s']:.1f} | {ratio} | {peak} |")
    if "orthanc" in results:
        orth = results["orthanc"]
        base = results["relay"]["study"]["median"]["baseline"]["seconds"]
        for phase in ("receive", "anonymize", "forward", "total"):
            m = orth["median"][phase]
            ratio = f"{base / m['seconds']:.2f}" if phase in ("receive", "total") else ""
            lines.append(f"| study | | Orthanc {phase} | {m['seconds']:.2f} | {m['mb_per_s']:.0f} | "
                         f"{m['instances_per_s']:.1f} | {ratio} | |")
    if "floor" in results:
        lines += ["", "| reference: minimal pynetdicom receiver, acknowledged | pynetdicom, no fsync | "
                  "pynetdicom, fsync per instance | gateway's pynetdicom, fsync per instance |",
                  "| --- | --- | --- | --- |"]
        for name, floor in results["floor"].items():
            cells = [f"{floor[v]['ack']['seconds']:.2f} s ({floor[v]['ack_ratio']:.2f})"
                     for v in FLOOR_VARIANTS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| de-identification alone | size | deid MB/s | plain copy MB/s | deid/copy |",
              "| --- | --- | --- | --- | --- |"]
    for name, d in results["deid"].items():
        if name == "memory":
            continue
        lines.append(f"| {name} | {d['bytes'] / MB:.0f} MB | {d['deid_mb_per_s']:.0f} | "
                     f"{d['copy_mb_per_s']:.0f} | {d['deid_mb_per_s'] / d['copy_mb_per_s']:.2f} |")
    mem = results["deid"]["memory"]
    lines += ["", f"De-identification peak RSS on a {mem['bytes'] / GB:.1f} GB instance: "
              f"{mem['peak_rss_mb']:.0f} MB ({mem['bytes'] / MB / mem['seconds']:.0f} MB/s)", "",
              "| target | measured | limit | |", "| --- | --- | --- | --- |"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.3f} | {t['op']} {t['limit']} | "
                     f"{'ok' if t['ok'] else 'MISSED'} |")
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    dcmtk = subprocess.run([STORESCU, "--version"], capture_output=True, text=True, check=False)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "gateway"],
                           cwd=ROOT, capture_output=True, text=True, check=False)
    return {
        "commit": commit.stdout.strip(),
        "gateway_tree_modified": bool(dirty.stdout.strip()),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dcmtk": (dcmtk.stdout.splitlines() or ["?"])[0],
    }


# ---------------------------------------------------------------------------


def _plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan(256 * MB, GB, 512 * MB, 50, MB, args.rounds, not args.no_orthanc)
    else:
        plan = Plan(GB, 4 * GB, 2 * GB, 200, MB, args.rounds, not args.no_orthanc)
    if args.no_huge:
        plan.huge_bytes = None
    DATA.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(DATA).free
    missing = sum(
        size for size in (plan.large_bytes, plan.deid_bytes)
        if not (DATA / f"volume-{size // MB}MB.dcm").is_file()
    )
    if not (_study_dir(plan.study_count, plan.study_instance_bytes) / ".complete").is_file():
        missing += plan.study_count * plan.study_instance_bytes
    need = missing + SCRATCH_FACTOR * max(plan.large_bytes, plan.deid_bytes) + 2 * GB
    if free < need:
        sys.exit(f"benchmarks/run: {free / GB:.1f} GB free in {DATA}, {need / GB:.1f} GB needed")
    if plan.huge_bytes is not None:
        exists = (DATA / f"volume-{plan.huge_bytes // MB}MB.dcm").is_file()
        need = (0 if exists else plan.huge_bytes) + missing + SCRATCH_FACTOR * plan.huge_bytes + 2 * GB
        if free < need:
            log(f"only {free / GB:.1f} GB free, {need / GB:.1f} GB needed: skipping the "
                f"{plan.huge_bytes // GB} GB instance and the memory-flatness check")
            plan.huge_bytes = None
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller data (256 MB and 1 GB instances, 50-instance study)")
    parser.add_argument("--no-huge", action="store_true",
                        help="skip the 4 GB instance and so the memory-flatness check")
    parser.add_argument("--no-orthanc", action="store_true", help="skip Orthanc even if installed")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per mode (default 5, at least 3)")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    plan = _plan(args)
    DATA.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    large = Workload("large", [_volume(plan.large_bytes)])
    study = Workload("study", _study(plan.study_count, plan.study_instance_bytes))
    huge = Workload("huge", [_volume(plan.huge_bytes)]) if plan.huge_bytes else None
    memory_file = _volume(plan.deid_bytes)
    key = _key()
    log(f"data ready in {time.monotonic() - started:.0f} s")

    results: dict[str, Any] = {
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "benchmarks/run " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": _machine(),
        "plan": dict(vars(plan)),
        "relay": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-", dir=DATA) as tmp:
        scratch = Path(tmp)
        baseline = Storescp(scratch / "baseline").start()
        archive = Storescp(scratch / "archive").start()
        try:
            for work in (large, study):
                results["relay"][work.name] = relay_benchmark(
                    work, plan.rounds, key, baseline, archive, scratch
                )
            if huge is not None:
                results["relay"]["huge"] = relay_benchmark(huge, 1, key, baseline, archive, scratch)
            results["floor"] = floor_benchmark([large, study], plan.rounds, baseline, scratch)
            results["deid"] = deid_benchmark([large, study], memory_file, plan.rounds, key, scratch)
            if plan.orthanc and Path(ORTHANC).is_file():
                results["orthanc"] = orthanc_benchmark(study, plan.rounds, archive, scratch)
        finally:
            baseline.stop()
            archive.stop()
    results["targets"] = _targets(results)
    results["passed"] = all(t["ok"] for t in results["targets"])
    results["duration_s"] = round(time.monotonic() - started, 1)
    table = _table(results)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{results['timestamp'].replace(':', '')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults: {out.relative_to(ROOT)} ({results['duration_s']:.0f} s)")
    missed = [t["target"] for t in results["targets"] if not t["ok"]]
    if missed:
        print("MISSED: " + "; ".join(missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
