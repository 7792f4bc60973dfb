"""The stages of ``benchmarks/gpu_check.py``, the one-shot GPU check, one idea per module.

common        constants (cases, targets, budgets), logging, the stage Recorder, statistics
targets       derived numbers (GB/s, %-of-copy, speed-ups) and PASS/FAIL/N/A per target
report        the table and verdict printed last, the JSON file, ``finish``
fake          FAKE results with the real schema for ``--dry-run``
environment   GPU detection, deepcore made importable without a package index, versions
gpu           the Gpu helper: event timing, the float64 correctness check, peak memory
measure       copy bandwidth, the bf16 probe, one case (fused, unfused, torch)
pytest_stage  the GPU tests in a subprocess with a timeout
run           the real run: every stage in order, each guarded
"""
