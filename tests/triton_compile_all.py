"""Compiles every Triton kernel of fasthg for Hopper (sm_90) ahead of time, without a GPU:
Triton's front end, its MLIR passes, LLVM and ptxas, which the interpreter skips (it runs
the kernels as NumPy). Run by tests/test_triton_compiles.py in a process of its own, since
the test session's triton runs interpreted. Prints each activation dtype, then one line per
kernel variant compiled."""
import importlib
import itertools
import os

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiling needs triton without the interpreter"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fasthg.ops import registry  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_variant(kernel, pointers, constexprs, index):
    """pointers: argument name -> element type; constexprs: name -> value; other args: index."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = index
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET)
    print(kernel.__name__, index, sorted(constexprs.items(), key=lambda kv: kv[0]))


def main():
    """Every registered op's kernels and the Triton-only ones (kernels/NAME.py's
    compile_variants), for every activation dtype, layout and index type."""
    for name in registry.names() + registry.TRITON_ONLY_KERNELS:
        module = importlib.import_module(f"fasthg.kernels.{name}")
        for dt, cl, int64 in itertools.product(("fp32", "fp16", "bf16", "fp64"), (False, True), (False, True)):
            print(name, dt, "channels_last" if cl else "nchw")
            for kernel, pointers, constexprs in module.compile_variants(dt, cl, int64):
                compile_variant(kernel, pointers, constexprs, "i64" if int64 else "i32")
    print("all compiled")


if __name__ == "__main__":
    main()
