"""`python -m fasthg.ops`: the registered fused ops, a line each (name, backends, native
schemas); with --test-files, their test files on one line (benchmarks/gpu_check.sh)."""
import sys

from fasthg.ops import registry

if "--test-files" in sys.argv[1:]:
    print(" ".join(registry.test_files()))
else:
    for op in registry.ops():
        print(f"{op.name}: backends {', '.join(op.backends)}; schemas {', '.join(op.schemas)}")
