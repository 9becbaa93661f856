"""Benchmarks of the gateway against dcmtk and Orthanc; run with ``benchmarks/run``."""
