"""Every fused op of the registry at every shape hg2 runs it at 256x256 (conftest.SHAPES;
bn_add_relu, which the hourglass has not, at ResNet-50's block outputs; batch 16 on GPU, 4 on
CPU), NCHW and channels_last, float32 and half precision, in each of its modes (upsample_add
and max_pool2x2: forward, forward+backward; bn_relu and bn_add_relu: train forward, eval
forward, train forward+backward): eager against every backend and torch.compile of the eager
composition. The calls are fasthg.bench.cases', the same `fasthg bench` times, over inputs
that rotate through twice the last-level cache.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

Each result carries extra_info.speedup_vs_eager, against the eager run of the same group."""
import itertools

import pytest

from conftest import BATCH, CACHE_BYTES, DEVICE, DTYPES, SHAPES, backends_for, record, shape_id, sync
from fasthg.bench import LAYOUTS, dtype_name, op_calls, op_case
from fasthg.ops import registry

# backend innermost, eager first, so that eager runs first in each group
CASES = [(op.name, mode, dtype, layout, shape, backend)
         for op in registry.ops()
         for mode, dtype, layout, shape, backend in itertools.product(
             op.traffic, DTYPES, LAYOUTS, SHAPES[op.name], backends_for(op.name) + ["compile"])]


@pytest.mark.parametrize("op,mode,dtype,layout,shape,backend", CASES,
                         ids=[f"{o}-{m.replace(' ', '-')}-{dtype_name(d)}-{lay}-{shape_id(s)}-{b}"
                              for o, m, d, lay, s, b in CASES])
def test_op(benchmark, op, mode, dtype, layout, shape, backend):
    c, h, w = shape
    case = op_case(op, (BATCH, c, h, w), dtype, layout)
    benchmark.group = f"{op} {mode} {dtype_name(dtype)} {layout} {shape_id(shape)}"
    call = op_calls(case, DEVICE, [backend], CACHE_BYTES)[mode][backend]

    def fn():
        call()
        sync()

    fn()  # warm-up (and compilation) outside the timing
    benchmark(fn)
    record(benchmark, (op, mode, dtype, layout, shape), backend)
