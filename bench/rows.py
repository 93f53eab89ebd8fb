"""Recording one bench row: time it with pytest-benchmark, attach the metrics, or skip it with a
reason (skipped rows are kept in the results, never dropped)."""
from __future__ import annotations

import time
from typing import Any, Callable

import pytest

from bench.measure import H100_BW

#: Row fields copied into pytest-benchmark's extra_info (and so into --benchmark-json).
EXTRA_KEYS = (
    "suite", "name", "size", "contender", "mode", "config", "trainable_params", "throughput",
    "throughput_unit", "saved_bytes", "saved_method", "cuda_memory", "hbm_bytes", "hbm_method",
    "h100_lower_bound_s", "launches", "launches_per_block", "launches_method", "first_call_s", "note",
)


def skip(collector, row: dict[str, Any], reason: str) -> None:
    """Record `row` as skipped with `reason`, then skip the test with the same reason."""
    row.update(status="skipped", reason=reason)
    collector.add(row)
    pytest.skip(reason)


def timed(benchmark, collector, row: dict[str, Any], fn: Callable[[], Any], *, rounds: int,
          warmup: int, units: int, unit_name: str) -> dict[str, Any]:
    """Time `fn` (already warmed up / compiled by the caller) and record the row.

    `units` images or tokens per call give the throughput. With --benchmark-disable,
    pytest-benchmark calls `fn` once untimed; the row then carries that single call's wall time
    (rounds=1, no IQR) so smoke runs still exercise every code path.
    """
    if row.get("hbm_bytes") is not None:
        row["h100_lower_bound_s"] = row["hbm_bytes"] / H100_BW
    t0 = time.perf_counter()
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    wall = time.perf_counter() - t0
    st = benchmark.stats.stats if benchmark.stats is not None else None
    if st is not None:
        row.update(time_median_s=st.median, time_iqr_s=st.iqr, time_mean_s=st.mean, time_min_s=st.min,
                   time_max_s=st.max, rounds=st.rounds)
    else:
        row.update(time_median_s=wall, time_iqr_s=None, time_mean_s=wall, time_min_s=wall, time_max_s=wall,
                   rounds=1, note=(row.get("note") or "") + " benchmark disabled: one untimed call".strip())
    row["throughput"] = units / row["time_median_s"] if row["time_median_s"] else None
    row["throughput_unit"] = unit_name
    row["status"] = "ok"
    for k in EXTRA_KEYS:
        if row.get(k) is not None:
            benchmark.extra_info[k] = row[k]
    collector.add(row)
    return row
