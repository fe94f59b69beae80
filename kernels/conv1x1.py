"""Triton kernels of the 1x1 convolution with the previous BatchNorm-ReLU in its prologue and
the next BatchNorm's statistics in its epilogue: y = conv1x1(relu(bn(x))), x channels_last,
taken as a [P = N*H*W, C] matrix (an NCHW x is made channels_last first: one copy, and y is
returned NCHW by a second; the hourglass runs channels_last on the GPU, where this pays).

Forward (one GEMM): each program loads x tiles (a few row tiles in turn), applies the
per-channel scale/shift and ReLU in registers (the normalised activation a = relu(bn(x))
never reaches memory), multiplies by the weight, adds the bias and writes y; with STATS it
also writes the per-channel sum and sum of squares of its y (one partial per program), which
_sum_partials_kernel adds up in a fixed order (deterministic, no atomics).

Backward, three launches in training (eval: the first is skipped, the second does both):
- data, REDUCE: g = relu'(pre) * (grad_y @ W) per tile, and per-program partial sums of g
  and g * xhat (d bn_bias and d bn_weight, and BN's two mean terms);
- data, WRITE_DX: g again (the GEMM recomputed), dx = bn_w * invstd * (g - mean(g) -
  xhat * mean(g * xhat)). Recomputing g rather than writing it once: g is [P, C] and
  grad_y [P, Cout], so the second pass reads grad_y (Cout per pixel) where writing g would
  write and read back 2C per pixel; the extra GEMM is cheap in these memory-bound shapes;
- weight: dW = grad_y^T @ a, its input tile recomputed from x the same way, split over pixels
  into partials (few output tiles, many pixels), and d conv_bias = sum of grad_y.

The dots take the activation dtype's operands (a is rounded to it, as eager's stored a is) and
accumulate in float32 (float64 for float64 x); float32 dots are IEEE, not TF32, so they match
eager float32. Per-channel sums accumulate in float64, as kernels/bn_relu.py's do: BN's
backward subtracts nearly equal terms."""
import torch
import triton
import triton.language as tl

from fasthg.kernels._index import needs_int64, program_index
from fasthg.ops.layout import memory_format_of

# Tile sizes (rows of pixels, output channels, reduction step). Fixed rather than autotuned,
# so that the ahead-of-time compile list names every variant; tuning them awaits a GPU.
BM, BN, BK = 64, 64, 32
SUM_BLOCK = 256
MIN_SPLIT_ROWS = 2048


@triton.jit
def _pre_activation(x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, rows, rmask, k, kmask, C, ACC: tl.constexpr):
    """x's tile (rows x channels k) in ACC, bn(x) of it, xhat, and which elements exist."""
    m = rmask[:, None] & kmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * C + k[None, :], mask=m, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + k, mask=kmask, other=0.0).to(ACC)[None, :]
    invstd = tl.load(invstd_ptr + k, mask=kmask, other=0.0).to(ACC)[None, :]
    scale = invstd * tl.load(bnw_ptr + k, mask=kmask, other=0.0).to(ACC)[None, :]
    shift = tl.load(bnb_ptr + k, mask=kmask, other=0.0).to(ACC)[None, :]
    centred = x - mean
    return centred * scale + shift, centred * invstd, m


@triton.jit
def _activation(x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, rows, rmask, k, kmask, C, ACC: tl.constexpr):
    """relu(bn(x)) of a tile, zero outside the tensor (the shift would make it nonzero there)."""
    pre, _, m = _pre_activation(x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, rows, rmask, k, kmask, C, ACC)
    return tl.where(m, tl.where(pre < 0, 0.0, pre), 0.0)  # a NaN stays NaN, as in torch.relu


@triton.jit
def _relu_passes(pre):
    """Where relu's backward passes the gradient: not pre <= 0 (a NaN passes, as in
    threshold_backward); kernels/bn_relu.py's rule."""
    return (pre > 0) | (pre != pre)


@triton.jit
def _forward_kernel(x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, w_ptr, bias_ptr, y_ptr, s_ptr,
                    P, C, COUT, TILES, STATS: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """TILES row tiles of BM pixels x BN output channels; with STATS, one partial (sum, sum of
    squares) per program for all its tiles (fewer partials to write and add up)."""
    pid_m = program_index(0, INT64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < COUT
    bias = tl.load(bias_ptr + n, mask=nmask, other=0.0).to(ACC)[None, :]
    s1 = tl.zeros([BN], dtype=tl.float64)
    s2 = tl.zeros([BN], dtype=tl.float64)
    for t in range(0, TILES):
        rows = (pid_m * TILES + t) * BM + tl.arange(0, BM)
        rmask = rows < P
        acc = tl.zeros([BM, BN], dtype=ACC)
        for k0 in range(0, C, BK):
            k = k0 + tl.arange(0, BK)
            kmask = k < C
            a = _activation(x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, rows, rmask, k, kmask, C, ACC)
            # w is [COUT, C]: its transpose's tile [k, n]
            w = tl.load(w_ptr + n[None, :] * C + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(a.to(w_ptr.dtype.element_ty), w, acc, input_precision="ieee")
        y = (acc + bias).to(y_ptr.dtype.element_ty)
        m = rmask[:, None] & nmask[None, :]
        tl.store(y_ptr + rows[:, None] * COUT + n[None, :], y, mask=m)
        if STATS:  # of y as stored (rounded to its dtype): what the next BN will normalise
            yd = tl.where(m, y.to(tl.float64), 0.0)
            s1 += tl.sum(yd, axis=0)
            s2 += tl.sum(yd * yd, axis=0)
    if STATS:
        out = pid_m * 2 * COUT + n  # s_ptr is [programs, 2, COUT]
        tl.store(s_ptr + out, s1, mask=nmask)
        tl.store(s_ptr + out + COUT, s2, mask=nmask)


@triton.jit
def _backward_data_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, w_ptr, mean_g_ptr, mean_gx_ptr,
                          dx_ptr, s_ptr, P, C, COUT, TILES, REDUCE: tl.constexpr, WRITE_DX: tl.constexpr,
                          CENTRE: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """TILES row tiles of BM pixels x BN input channels: g = relu'(bn(x)) * (grad_y @ W); REDUCE
    writes the program's per-channel partial sums of g and g * xhat, WRITE_DX writes dx
    (CENTRE: BN's training backward, with the mean terms; else eval's)."""
    pid_m = program_index(0, INT64)
    c = tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = c < C
    sg = tl.zeros([BN], dtype=tl.float64)
    sgx = tl.zeros([BN], dtype=tl.float64)
    for t in range(0, TILES):
        rows = (pid_m * TILES + t) * BM + tl.arange(0, BM)
        rmask = rows < P
        acc = tl.zeros([BM, BN], dtype=ACC)
        for k0 in range(0, COUT, BK):
            k = k0 + tl.arange(0, BK)
            kmask = k < COUT
            dy = tl.load(dy_ptr + rows[:, None] * COUT + k[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0)
            w = tl.load(w_ptr + k[:, None] * C + c[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(dy, w, acc, input_precision="ieee")
        pre, xhat, m = _pre_activation(x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, rows, rmask, c, cmask, C,
                                       ACC)
        g = tl.where(m & _relu_passes(pre), acc, 0.0)
        if REDUCE:
            gd = g.to(tl.float64)
            sg += tl.sum(gd, axis=0)
            sgx += tl.sum(gd * xhat.to(tl.float64), axis=0)
        if WRITE_DX:
            invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(ACC)
            k_dx = (tl.load(bnw_ptr + c, mask=cmask, other=0.0).to(ACC) * invstd)[None, :]
            if CENTRE:
                mean_g = tl.load(mean_g_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
                mean_gx = tl.load(mean_gx_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
                dx = k_dx * (g - mean_g - xhat * mean_gx)
            else:
                dx = k_dx * g
            tl.store(dx_ptr + rows[:, None] * C + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
    if REDUCE:
        out = pid_m * 2 * C + c  # s_ptr is [programs, 2, C]
        tl.store(s_ptr + out, sg, mask=cmask)
        tl.store(s_ptr + out + C, sgx, mask=cmask)


@triton.jit
def _backward_weight_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, dw_ptr, db_ptr, P, C, COUT,
                            ROWS_PER_SPLIT, ACC: tl.constexpr, INT64: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Partial dW[n, k] = sum over this split's pixels of grad_y[p, n] * a[p, k] (BM output
    channels n, BN input channels k, pixels in steps of BK), into dw_ptr[split]; the programs
    of the first input-channel column also write the partial d conv_bias = sum of grad_y."""
    n = tl.program_id(0) * BM + tl.arange(0, BM)
    nmask = n < COUT
    kc = tl.program_id(1) * BN + tl.arange(0, BN)
    kmask = kc < C
    split = program_index(2, INT64)
    start = split * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, P)
    acc = tl.zeros([BM, BN], dtype=ACC)
    dbias = tl.zeros([BM], dtype=ACC)
    for p0 in range(start, end, BK):
        p = p0 + tl.arange(0, BK)
        pmask = p < end
        dyt = tl.load(dy_ptr + p[None, :] * COUT + n[:, None], mask=nmask[:, None] & pmask[None, :], other=0.0)
        a = _activation(x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, p, pmask, kc, kmask, C, ACC)
        acc = tl.dot(dyt, a.to(dy_ptr.dtype.element_ty), acc, input_precision="ieee")
        dbias += tl.sum(dyt.to(ACC), axis=1)
    tl.store(dw_ptr + (split * COUT + n[:, None]) * C + kc[None, :], acc, mask=nmask[:, None] & kmask[None, :])
    tl.store(db_ptr + split * COUT + n, dbias, mask=nmask & (tl.program_id(1) == 0))


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, out2_ptr, T, L, HALF, BLOCK: tl.constexpr):
    """Sums over t of part[t, j] (j < L), t in order, in float64: the same sum every run. Sums
    j < HALF go to out[j], the rest to out2[j - HALF] (two outputs that are not views of one
    tensor, which a custom op may not return)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < L
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for t in range(0, T):
        acc += tl.load(part_ptr + t * L + j, mask=mask, other=0.0).to(tl.float64)
    acc = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + j, acc, mask=mask & (j < HALF))
    tl.store(out2_ptr + (j - HALF), acc, mask=mask & (j >= HALF))


def _acc_types(dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _matrix(t):
    """A [N, C, H, W] tensor as its channels_last [N*H*W, C] matrix (a copy when NCHW)."""
    t = t.contiguous(memory_format=torch.channels_last)
    return t, t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _sum_partials(part: torch.Tensor, dtype, halves: bool = False):
    """part [T, ...] summed over T in a fixed order, as `dtype`; with `halves` part is
    [T, 2, L] and the result two separate [L] tensors."""
    T = part.shape[0]
    shape = part.shape[2:] if halves else part.shape[1:]
    out = torch.empty(shape, dtype=dtype, device=part.device)
    out2 = torch.empty(shape, dtype=dtype, device=part.device) if halves else out
    L = part[0].numel()
    _sum_partials_kernel[(triton.cdiv(L, SUM_BLOCK),)](part, out, out2, T, L, out.numel(), BLOCK=SUM_BLOCK)
    return (out, out2) if halves else out


def tiles_per_program(row_tiles: int, column_tiles: int, sms: int) -> int:
    """Row tiles each program of the forward and data-gradient passes runs: enough programs
    for 2 per SM, at most 16 tiles each; each program writes one partial for its tiles, so
    this divides the partials' traffic (fasthg.bench.traffic mirrors it)."""
    return max(1, min(16, row_tiles * column_tiles // (2 * sms)))


def _row_grid(P: int, columns: int, device):
    """(TILES, grid) of the forward and data-gradient passes; 2 tiles a program in the
    interpreter, so that the tests run the loop (and a program whose second tile is empty)."""
    tiles = triton.cdiv(P, BM)
    col_tiles = triton.cdiv(columns, BN)
    per = 2 if device.type != "cuda" else tiles_per_program(
        tiles, col_tiles, torch.cuda.get_device_properties(device).multi_processor_count)
    return per, (triton.cdiv(tiles, per), col_tiles)


def _splits(P: int, tiles: int, device) -> int:
    """Pixel splits of the weight gradient: about 4 programs per SM, but at least
    MIN_SPLIT_ROWS pixels each, so that the float32 partials ([splits, Cout, C], written and
    read back) stay a few percent of the pass's traffic. In the interpreter (CPU) any split
    of BK rows, so that small test shapes run several."""
    if device.type != "cuda":
        return max(1, min(8, triton.cdiv(P, BK)))
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, tiles), triton.cdiv(P, MIN_SPLIT_ROWS)))


def forward(x, mean, invstd, bn_weight, bn_bias, weight, bias, out_stats: bool):
    """y = conv1x1(relu(bn(x))) in x's memory format, and with out_stats y's per-channel
    (sum, sum of squares) in float32 (float64 for float64 x); else two empty tensors.
    weight: [Cout, C] or [Cout, C, 1, 1] in x's dtype; the rest per channel."""
    xcl, xm = _matrix(x)
    P, C = xm.shape
    w = weight.reshape(weight.shape[0], C).contiguous()
    cout = w.shape[0]
    acc, pdtype = _acc_types(x.dtype)
    y = torch.empty((x.shape[0], cout, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    per, grid = _row_grid(P, cout, x.device)
    parts = torch.empty((grid[0], 2, cout) if out_stats else (1,), dtype=torch.float64, device=x.device)
    _forward_kernel[grid](xcl, mean, invstd, bn_weight, bn_bias, w, bias, y, parts, P, C, cout, per,
                          STATS=out_stats, ACC=acc, INT64=needs_int64(x, y), BM=BM, BN=BN, BK=BK)
    y = y.contiguous(memory_format=memory_format_of(x))
    if not out_stats:
        return y, x.new_empty(0, dtype=pdtype), x.new_empty(0, dtype=pdtype)
    return (y,) + _sum_partials(parts, pdtype, halves=True)


def backward(grad_y, x, mean, invstd, bn_weight, bn_bias, weight, training: bool):
    """(grad_x, grad_bn_weight, grad_bn_bias, grad_weight [Cout, C, 1, 1], grad_bias): with
    training, BN's training backward (mean and invstd are x's batch statistics)."""
    xcl, xm = _matrix(x)
    P, C = xm.shape
    w = weight.reshape(weight.shape[0], C).contiguous()
    cout = w.shape[0]
    dy = grad_y.to(x.dtype).contiguous(memory_format=torch.channels_last)
    acc, pdtype = _acc_types(x.dtype)
    int64 = needs_int64(x, dy)
    dx = torch.empty_like(xcl, memory_format=torch.channels_last)
    per, grid = _row_grid(P, C, x.device)
    parts = torch.empty((grid[0], 2, C), dtype=torch.float64, device=x.device)
    common = (dy, xcl, mean, invstd, bn_weight, bn_bias, w)

    def data_pass(mean_g, mean_gx, reduce, write_dx):
        _backward_data_kernel[grid](*common, mean_g, mean_gx, dx, parts, P, C, cout, per,
                                    REDUCE=reduce, WRITE_DX=write_dx, CENTRE=training, ACC=acc, INT64=int64,
                                    BM=BM, BN=BN, BK=BK)

    if training:
        data_pass(invstd, invstd, True, False)  # (the mean pointers are unread without WRITE_DX)
        sums = _sum_partials(parts, pdtype, halves=True)
        data_pass(sums[0] / P, sums[1] / P, False, True)
    else:
        data_pass(invstd, invstd, True, True)  # (nor without CENTRE)
        sums = _sum_partials(parts, pdtype, halves=True)
    wgrid = (triton.cdiv(cout, BM), triton.cdiv(C, BN))
    splits = _splits(P, wgrid[0] * wgrid[1], x.device)
    rows_per_split = triton.cdiv(triton.cdiv(P, splits), BK) * BK
    splits = triton.cdiv(P, rows_per_split)
    dw_parts = torch.empty((splits, cout, C), dtype=pdtype, device=x.device)
    db_parts = torch.empty((splits, cout), dtype=pdtype, device=x.device)
    _backward_weight_kernel[wgrid + (splits,)](dy, xcl, mean, invstd, bn_weight, bn_bias, dw_parts, db_parts, P, C,
                                               cout, rows_per_split, ACC=acc, INT64=int64, BM=BM, BN=BN, BK=BK)
    dw = _sum_partials(dw_parts, x.dtype).view(cout, C, 1, 1)
    dbias = _sum_partials(db_parts, pdtype)
    dx = dx.contiguous(memory_format=memory_format_of(x))
    return dx, sums[1], sums[0], dw, dbias


def compile_variants(dt: str, channels_last: bool, int64: bool):
    """(kernel, pointer argument -> element type, constexprs) of every kernel variant launched
    for activations of Triton type `dt` (tests/triton_compile_all.py compiles them for sm_90).
    The kernels take channels_last matrices only (an NCHW x is copied first and runs the same
    kernels), so the NCHW list is empty."""
    if not channels_last:
        return
    acc = tl.float64 if dt == "fp64" else tl.float32
    param = "fp64" if dt == "fp64" else "fp32"
    params = {k: param for k in ("mean_ptr", "invstd_ptr", "bnw_ptr", "bnb_ptr", "bias_ptr", "mean_g_ptr",
                                 "mean_gx_ptr")}
    act = {k: dt for k in ("x_ptr", "w_ptr", "y_ptr", "dy_ptr", "dx_ptr")}
    sums = {"s_ptr": "fp64"}
    tiles = dict(ACC=acc, INT64=int64, BM=BM, BN=BN, BK=BK)
    for stats in (False, True):
        yield _forward_kernel, {**act, **params, **sums}, dict(tiles, STATS=stats)
    for reduce, write_dx, centre in ((True, False, True), (False, True, True), (True, True, False)):
        yield (_backward_data_kernel, {**act, **params, **sums},
               dict(tiles, REDUCE=reduce, WRITE_DX=write_dx, CENTRE=centre))
    yield _backward_weight_kernel, {**act, **params, "dw_ptr": param, "db_ptr": param}, tiles
    if not int64:  # its offsets are of the partials, never large; the same kernel either way
        for part, out in sorted({("fp64", param), (param, dt), (param, param)}):
            yield _sum_partials_kernel, {"part_ptr": part, "out_ptr": out, "out2_ptr": out}, dict(BLOCK=SUM_BLOCK)
