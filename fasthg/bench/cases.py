"""What fasthg bench and the pytest-benchmark suite time, built once for both: per fused op of
the registry, a builder of its timed calls, {mode: {backend: fn}}, over rotating inputs
(fasthg.bench.harness.Rotation); and the model's training step and inference forward.

A backend named "compile" is torch.compile of the op's eager composition (or of the eager
model)."""
from typing import Callable, Dict, List

import torch

from fasthg import ops
from fasthg.bench.budget import model_spec
from fasthg.bench.harness import LAYOUTS, Rotation, compiled, dtype_name, layout_name
from fasthg.models import PRESETS
from fasthg.ops import reference, registry


def op_case(op: str, shape, dtype: torch.dtype, layout) -> dict:
    """One case of an op: its full-resolution shape [N, C, H, W], dtype and memory format
    (a torch.memory_format or "nchw"/"nhwc"); keys starting with _ stay out of reports."""
    fmt = LAYOUTS[layout] if isinstance(layout, str) else layout
    return {"op": op, "level": shape[2], "shape": list(shape), "dtype": dtype_name(dtype),
            "layout": layout_name(fmt), "_dtype": dtype, "_layout": fmt}


def op_cases(op: str, batch: int, channels: int, levels, dtypes, layouts):
    for dtype in dtypes:
        for layout in layouts:
            for hw in levels:
                yield op_case(op, (batch, channels, hw, hw), dtype, layout)


def upsample_add_calls(case, device, backends, cache_bytes=0) -> Dict[str, Dict[str, Callable]]:
    """forward, and forward+backward (the grads of low and skip)."""
    n, c, hw, _ = case["shape"]
    fmt, dtype = case["_layout"], case["_dtype"]
    make = lambda *s: torch.randn(*s, device=device, dtype=dtype).contiguous(memory_format=fmt)  # noqa: E731

    def one_set():  # low, skip, grad, and leaf copies of low and skip for the backward
        low, skip = make(n, c, hw // 2, hw // 2), make(n, c, hw, hw)
        return low, skip, make(n, c, hw, hw), low.clone().requires_grad_(True), skip.clone().requires_grad_(True)

    sets = Rotation(one_set, cache_bytes)

    def fwd_of(f):
        def run():
            low, skip = sets.next()[:2]
            return f(low, skip)
        return run

    def fb_of(f):
        def run():
            _, _, grad, lowg, skipg = sets.next()
            return torch.autograd.grad(f(lowg, skipg), (lowg, skipg), grad)
        return run

    calls = {"forward": {}, "forward+backward": {}}
    for b in backends:
        f = compiled(reference.upsample_add, device) if b == "compile" else (
            lambda lo, sk, b=b: ops.upsample_add(lo, sk, backend=b))
        calls["forward"][b], calls["forward+backward"][b] = fwd_of(f), fb_of(f)
    return calls


def _x_forward(sets, f):
    """f(x) without grad, over Rotation sets of (x, grad, leaf copy of x)."""
    def run():
        with torch.no_grad():
            return f(sets.next()[0])
    return run


def _x_forward_backward(sets, f, params=()):
    """The grads of f(x) for x's leaf copy and `params`, over the same sets."""
    def run():
        _, grad, xg = sets.next()
        return torch.autograd.grad(f(xg), (xg, *params), grad)
    return run


def _bn_parameters(c, device):
    """A BN's weight and bias (requiring grad) and running statistics, for the BN ops' calls."""
    return (torch.rand(c, device=device, requires_grad=True), torch.randn(c, device=device, requires_grad=True),
            torch.zeros(c, device=device), torch.ones(c, device=device))


def bn_relu_calls(case, device, backends, cache_bytes=0) -> Dict[str, Dict[str, Callable]]:
    """Training forward, eval forward (both without grad) and training forward+backward (the
    grads of x, weight and bias); compile: relu(batch_norm(x)), the running statistics' update
    included, as in the op."""
    n, c, hw, _ = case["shape"]

    def one_set():  # x, grad, and a leaf copy of x for the backward
        x = torch.randn(n, c, hw, hw, device=device, dtype=case["_dtype"]).contiguous(memory_format=case["_layout"])
        return x, torch.randn_like(x), x.clone().requires_grad_(True)

    sets = Rotation(one_set, cache_bytes)
    w, b, rm, rv = _bn_parameters(c, device)

    def op_of(backend, training):
        if backend == "compile":
            return compiled(lambda inp: reference.bn_relu(inp, w, b, rm, rv, training, 0.1, 1e-5), device)
        return lambda inp: ops.bn_relu(inp, w, b, rm, rv, training, 0.1, 1e-5, backend=backend)

    calls = {"train forward": {}, "eval forward": {}, "train forward+backward": {}}
    for be in backends:
        train = op_of(be, True)
        calls["train forward"][be] = _x_forward(sets, train)
        calls["eval forward"][be] = _x_forward(sets, op_of(be, False))
        calls["train forward+backward"][be] = _x_forward_backward(sets, train, (w, b))
    return calls


def max_pool2x2_calls(case, device, backends, cache_bytes=0) -> Dict[str, Dict[str, Callable]]:
    """forward (without grad), and forward+backward (the grad of x)."""
    n, c, hw, _ = case["shape"]

    def one_set():  # x, the grad of the pooled output, and a leaf copy of x for the backward
        x = torch.randn(n, c, hw, hw, device=device, dtype=case["_dtype"]).contiguous(memory_format=case["_layout"])
        grad = torch.randn(n, c, hw // 2, hw // 2, device=device, dtype=case["_dtype"])
        return x, grad.contiguous(memory_format=case["_layout"]), x.clone().requires_grad_(True)

    sets = Rotation(one_set, cache_bytes)
    calls = {"forward": {}, "forward+backward": {}}
    for b in backends:
        f = compiled(reference.max_pool2x2, device) if b == "compile" else (
            lambda x, b=b: ops.max_pool2x2(x, backend=b))
        calls["forward"][b], calls["forward+backward"][b] = _x_forward(sets, f), _x_forward_backward(sets, f)
    return calls


def bn_add_relu_calls(case, device, backends, cache_bytes=0) -> Dict[str, Dict[str, Callable]]:
    """As bn_relu's, with a residual: training forward, eval forward and training
    forward+backward (the grads of x, the residual, weight and bias)."""
    n, c, hw, _ = case["shape"]
    make = lambda: torch.randn(n, c, hw, hw, device=device, dtype=case["_dtype"]).contiguous(  # noqa: E731
        memory_format=case["_layout"])

    def one_set():  # x, residual, grad, and leaf copies of x and the residual
        x, r = make(), make()
        return x, r, make(), x.clone().requires_grad_(True), r.clone().requires_grad_(True)

    sets = Rotation(one_set, cache_bytes)
    w, b, rm, rv = _bn_parameters(c, device)

    def op_of(backend, training):
        if backend == "compile":
            return compiled(lambda x, r: reference.bn_add_relu(x, r, w, b, rm, rv, training, 0.1, 1e-5), device)
        return lambda x, r: ops.bn_add_relu(x, r, w, b, rm, rv, training, 0.1, 1e-5, backend=backend)

    def fwd_of(f):
        def run():
            x, r = sets.next()[:2]
            with torch.no_grad():
                return f(x, r)
        return run

    def fb_of(f):
        def run():
            _, _, grad, xg, rg = sets.next()
            return torch.autograd.grad(f(xg, rg), (xg, rg, w, b), grad)
        return run

    calls = {"train forward": {}, "eval forward": {}, "train forward+backward": {}}
    for be in backends:
        train = op_of(be, True)
        calls["train forward"][be], calls["train forward+backward"][be] = fwd_of(train), fb_of(train)
        calls["eval forward"][be] = fwd_of(op_of(be, False))
    return calls


# The call builders of every registered op (tests/test_registry.py checks that none is missing).
CALLS = {"upsample_add": upsample_add_calls, "bn_relu": bn_relu_calls, "max_pool2x2": max_pool2x2_calls,
         "bn_add_relu": bn_add_relu_calls}


def op_calls(case, device, backends, cache_bytes=0) -> Dict[str, Dict[str, Callable]]:
    """{mode: {backend: timed call}} of a case (op_case) of a registered op."""
    registry.get(case["op"])
    if case["op"] not in CALLS:
        raise ValueError(f"fused op {case['op']!r} has no benchmark calls in fasthg.bench.cases.CALLS")
    return CALLS[case["op"]](case, device, backends, cache_bytes)


def hourglass_shapes(preset: str = "hg2", image_size: int = 256) -> Dict[str, List[tuple]]:
    """The (channels, height, width) at which a model runs each registered op, from one forward
    on the meta device (no memory, no compute): what each op's public function is called with
    (the argument FusedOp.shape_arg names), sorted largest first."""
    seen = {name: set() for name in registry.names()}
    model = PRESETS[preset](backend="eager").to("meta")
    originals = {name: getattr(ops, name) for name in seen}

    def spy(name):
        def call(*args, **kwargs):
            seen[name].add(tuple(args[registry.get(name).shape_arg].shape[1:]))
            return originals[name](*args, **kwargs)
        return call

    try:
        for name in seen:
            setattr(ops, name, spy(name))
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)
    return {op: sorted(shapes, key=lambda s: (-s[1] * s[2], -s[0])) for op, shapes in seen.items()}


def benchmark_shapes(preset: str = "hg2", image_size: int = 256) -> Dict[str, List[tuple]]:
    """The (channels, height, width) each registered op is benchmarked at: where the model runs
    it (hourglass_shapes), else the shapes its registry entry names."""
    shapes = hourglass_shapes(preset, image_size)
    return {op.name: shapes[op.name] or list(op.shapes) for op in registry.ops()}


class ModelCase:
    """A preset's training step (forward under autocast to `dtype` unless float32, MSE loss
    over every stack, backward, SGD as fasthg train runs it) and inference forward (eval mode,
    no grad) per backend, all from the same weights, with model and images in `layout`:
    `step[b]` and `infer[b]` are the timed calls. Call `eval()` before timing `infer`."""

    def __init__(self, preset: str, device, backends, batch: int, image_size: int,
                 layout=torch.contiguous_format, dtype=torch.float32):
        device = torch.device(device)
        self.preset, self.batch, self.image_size, self.layout, self.dtype = preset, batch, image_size, layout, dtype
        torch.manual_seed(0)
        base = PRESETS[preset](backend="eager").to(device)
        self.images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=layout)
        self.target = torch.randn(batch, base.num_stacks, base.num_joints, image_size // 4, image_size // 4,
                                  device=device)
        self.models, self._forwards = {}, {}
        for b in backends:  # "native+recompute": memory="recompute" (fasthg.bench.budget.model_spec)
            backend, mem = model_spec(b)
            m = PRESETS[preset](backend="eager" if b == "compile" else backend, memory=mem).to(device)
            m.load_state_dict(base.state_dict())
            m = m.to(memory_format=layout)
            self.models[b], self._forwards[b] = m, (compiled(m, device) if b == "compile" else m)
        from fasthg.train.trainer import optimizer_options  # (the training loop's imports are many)

        # SGD run as fasthg train runs it on this device (torch's fused CPU kernel on a CPU)
        sgd = optimizer_options("sgd", device)
        self._optims = {b: torch.optim.SGD(m.parameters(), lr=1e-4, **sgd) for b, m in self.models.items()}
        self._device_type = device.type
        self.step = {b: (lambda b=b: self._step(b)) for b in self.models}
        self.infer = {b: (lambda b=b: self._infer(b)) for b in self.models}

    def forward(self, b):
        with torch.autocast(self._device_type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self._forwards[b](self.images)

    def _step(self, b):
        self._optims[b].zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(self.forward(b).float(), self.target).backward()
        self._optims[b].step()

    def _infer(self, b):
        with torch.no_grad():
            self.forward(b)

    def eval(self):
        for m in self.models.values():
            m.eval()

    def saved_activation_bytes(self, b) -> int:
        """The bytes autograd keeps for the backward of one training forward (fasthg.bench.memory)."""
        from fasthg.bench import memory

        return memory.saved_activation_bytes(lambda: self.forward(b), self.models[b].parameters())
