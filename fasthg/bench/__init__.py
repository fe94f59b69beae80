"""Benchmarks of the fused ops and the models against eager: the timing harness
(fasthg.bench.harness), the timed calls built once for `fasthg bench` and the pytest-benchmark
suite (fasthg.bench.cases), the report with its table, JSON and chart (fasthg.bench.report,
fasthg.bench.chart), the memory counters (fasthg.bench.memory) and the allocator switch
(fasthg.bench.malloc)."""
from fasthg import device as device_info  # noqa: F401  (the tests patch its bf16 probe)
from fasthg.bench.cases import ModelCase, benchmark_shapes, hourglass_shapes, op_calls, op_case, op_cases
from fasthg.bench.harness import (LAYOUTS, SPREAD_LIMIT, Rotation, compiled, copy_bandwidth, default_dtypes,
                                  dtype_name, interleaved_medians, interleaved_samples, last_level_cache_bytes,
                                  layout_name, speedup, spread)
from fasthg.bench.report import (BAR_LEVELS, BARS, TRAFFIC, bar_checks, bench_model, bench_op, run, spread_warning,
                                 table, write_outputs)

__all__ = ["BARS", "BAR_LEVELS", "LAYOUTS", "SPREAD_LIMIT", "TRAFFIC", "ModelCase", "Rotation", "bar_checks",
           "bench_model", "bench_op", "benchmark_shapes", "compiled", "copy_bandwidth", "default_dtypes", "dtype_name",
           "hourglass_shapes",
           "interleaved_medians", "interleaved_samples", "last_level_cache_bytes", "layout_name", "op_calls",
           "op_case", "op_cases", "run", "speedup", "spread", "spread_warning", "table", "write_outputs"]
