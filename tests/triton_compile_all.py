"""Compiles every Triton kernel of fasthg for Hopper (sm_90) ahead of time, without a GPU:
Triton's front end, its MLIR passes, LLVM and ptxas, which the interpreter skips (it runs
the kernels as NumPy). Run by tests/test_triton_compiles.py in a process of its own, since
the test session's triton runs interpreted. Prints each activation dtype, then one line per
kernel variant compiled."""
import itertools
import os

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiling needs triton without the interpreter"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fasthg.kernels import bn_relu, upsample_add  # noqa: E402

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
    for dt, cl, int64 in itertools.product(("fp32", "fp16", "bf16", "fp64"), (False, True), (False, True)):
        print(dt, "channels_last" if cl else "nchw")
        index = "i64" if int64 else "i32"
        acc = tl.float64 if dt == "fp64" else tl.float32
        param = "fp64" if dt == "fp64" else "fp32"
        rows, cols, _ = bn_relu._tiles(256, 4096, cl, torch.device("cpu"))  # the tile the kernels get
        params = {k: param for k in ("mean_ptr", "invstd_ptr", "w_ptr", "b_ptr", "mean_g_ptr", "mean_gx_ptr")}
        act = {k: dt for k in ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")}
        sums = {k: "fp64" for k in ("s1_ptr", "s2_ptr", "sum_g_ptr", "sum_gx_ptr")}
        base = dict(CHANNELS_LAST=cl, INT64=int64)
        compile_variant(bn_relu._stats_kernel, {**act, **sums}, dict(base, ROWS=rows, COLS=cols), index)
        compile_variant(bn_relu._backward_reduce_kernel, {**act, **params, **sums},
                        dict(base, ACC=acc, ROWS=rows, COLS=cols), index)
        for k in (bn_relu._forward_kernel, bn_relu._backward_elemt_kernel):
            compile_variant(k, {**act, **params}, dict(base, ACC=acc, BLOCK=bn_relu.BLOCK), index)
        for twice in (True, False):
            ptrs = {"low_ptr": dt, "skip_ptr": dt, "out_ptr": dt, "grad_ptr": dt, "grad_low_ptr": dt,
                    "src_h_ptr": "i64", "src_w_ptr": "i64", "begin_h_ptr": "i64", "begin_w_ptr": "i64"}
            ups = dict(base, TWICE=twice, BLOCK=upsample_add.BLOCK)
            compile_variant(upsample_add._forward_kernel, ptrs, ups, index)
            compile_variant(upsample_add._backward_kernel, ptrs, dict(ups, KH=2, KW=3, ACC=acc), index)
    print("all compiled")


if __name__ == "__main__":
    main()
