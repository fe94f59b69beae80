"""fasthg.accelerate(model): the fused ops in a model the user already has, without touching
its code or its state_dict.

Patterns are found with torch.fx (a symbolic trace of each module's forward, once in training
and once in eval mode, since forwards may read self.training):
- BatchNorm2d -> ReLU (module, F.relu, torch.relu, .relu(), in-place variants) where the BN
  output has no other user, at every call of that BN: the BN module becomes a
  fasthg.nn.BNReLU in place (the same object, hence the very same parameters and buffers) and
  the ReLU is dropped from the traced forward. A ReLU after a BNReLU is dropped too (exact).
- BatchNorm2d -> addition of a residual (+, torch.add, .add, +=, either order) -> ReLU, where
  the BN output and the sum have no other user (a residual block's end): the BN module
  becomes a fasthg.nn.BNAddReLU in place and is called with (x, residual) in place of the
  three nodes. When both addends are such BNs (a downsampling block), the left one is fused
  and the other stays a BatchNorm2d, its output the residual.
- nearest 2x upsampling (nn.Upsample, nn.UpsamplingNearest2d, F.interpolate with
  scale_factor=2 or a size) whose only user is an addition (+, torch.add, .add, +=, either
  order) -> fasthg.ops.upsample_add, behind a run-time check (upsample_add_2x): shapes that
  would broadcast, a size other than twice the input's, mixed dtypes run the original ops.
- memory="recompute": a fused BN-ReLU whose output only feeds an nn.Conv2d -> the
  recomputing unit fasthg.ops.bn_relu_conv(x, bn, conv) (the same modules), which saves x
  and the BN statistics for the backward instead of relu(bn(x)).
- every nn.Conv2d (not a subclass) becomes a fasthg.nn.Conv2d in place: the same module
  everywhere, whose backward runs on fasthg.ops.conv2d where that applies (bf16 training on
  AMX CPUs: stride 1, padding k // 2, one group, channels_last); the report lists them as
  "backward on fasthg" ("conv2d").

A module whose graph changed gets its rewritten forward by a class swap of that instance (a
subclass of its own class, generated per instance, as torch.fx.GraphModule does): the object,
its attributes and its submodules stay the same, so state_dict keys and values do not change.
Such a module pickles and deep-copies as its original class plus a re-trace (_rebuild).
Modules that do not trace (data-dependent control flow, lists of branches, recursion) are
left as they are and their submodules are accelerated instead, recursively; an nn.Sequential
that does not trace gets its (BatchNorm2d, ReLU) neighbours fused at the module level.

Limits (torch.fx's): Python state other than self.training that a forward reads is fixed at
the time of accelerate(); call accelerate again after changing it.
"""
import copy
import dataclasses
import inspect
import linecache
import operator
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fasthg import ops
from fasthg.fuse import channels_last as layout
from fasthg.nn import BNAddReLU, BNReLU
from fasthg.nn.conv2d import Conv2d, is_plain
from fasthg.ops.bn_relu_conv import check_modules

MEMORY_MODES = ("default", "recompute")


# ----------------------------------------------------------------------------- the report
@dataclasses.dataclass(frozen=True)
class Change:
    """One line of the report: `kind` of pattern ("bn_relu", "bn_add_relu", "upsample_add",
    "bn_relu_conv", "conv2d", "trace", "layout"), `where` (a module path, or module path:node
    name), `action` ("fused", "already fused", "left alone", "traced submodules", "backward on
    fasthg", "already backward on fasthg", "channels_last", "already channels_last") and
    `reason`."""
    kind: str
    where: str
    action: str
    reason: str


CONV_ACTION = "backward on fasthg"


class Report(list):
    """The list of Change of one accelerate() call; str() is a table."""

    def fused(self) -> List[Change]:
        return [c for c in self if c.action == "fused"]

    def left_alone(self) -> List[Change]:
        return [c for c in self if c.action == "left alone"]

    def __str__(self):
        counts = {}
        for c in self:
            counts[c.action] = counts.get(c.action, 0) + 1
        head = "fasthg.accelerate: " + (", ".join(f"{n} {a}" for a, n in counts.items()) or "nothing found")
        if not self:
            return head
        w = [max(len(getattr(c, f)) for c in self) for f in ("kind", "where", "action")]
        rows = [f"  {c.kind:<{w[0]}}  {c.where:<{w[1]}}  {c.action:<{w[2]}}  {c.reason}" for c in self]
        return "\n".join([head] + rows)

    __repr__ = __str__


@dataclasses.dataclass
class _Options:
    backend: str
    memory: str
    sync_bn: bool
    fused: Set[Tuple[str, str]] = dataclasses.field(default_factory=set)  # (kind, node name)


# ----------------------------------------------------------------------------- run-time op
def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def upsample_add_2x(low, skip, size=None, backend="auto", upsample_first=True):
    """What accelerate puts in place of `F.interpolate(low, scale_factor=2 or size=size,
    mode="nearest") + skip` (or skip + ...): fasthg.ops.upsample_add where that computes the
    same (4-D floating tensors, same dtype and device, skip exactly twice low's height and
    width, `size` (if given) that size), the original ops otherwise."""
    if (isinstance(low, torch.Tensor) and isinstance(skip, torch.Tensor) and low.dim() == 4 and skip.dim() == 4
            and low.is_floating_point() and low.dtype == skip.dtype and low.device == skip.device
            and low.numel() > 0
            and tuple(skip.shape) == (low.shape[0], low.shape[1], 2 * low.shape[2], 2 * low.shape[3])
            and (size is None or _pair(size) == tuple(skip.shape[2:]))):
        return ops.upsample_add(low, skip, backend=backend)
    up = F.interpolate(low, size=size, scale_factor=None if size is not None else 2.0, mode="nearest")
    return up + skip if upsample_first else skip + up


# ----------------------------------------------------------------------------- tracing
class _Proxy(fx.Proxy):
    """Records `a += b` as operator.iadd (fx's own Proxy records it as an out-of-place add,
    which loses the mutation)."""

    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})

    def __isub__(self, other):
        return self.tracer.create_proxy("call_function", operator.isub, (self, other), {})

    def __imul__(self, other):
        return self.tracer.create_proxy("call_function", operator.imul, (self, other), {})

    def __itruediv__(self, other):
        return self.tracer.create_proxy("call_function", operator.itruediv, (self, other), {})


class _Tracer(fx.Tracer):
    """Modules with hooks stay calls (tracing through them would drop their hooks); `hooked`
    names them, to be accelerated on their own."""

    def __init__(self):
        super().__init__()
        self.hooked = set()

    def proxy(self, node):
        return _Proxy(node, self)

    def is_leaf_module(self, m, qualname):
        if isinstance(m, (BNReLU, BNAddReLU, Conv2d)) or super().is_leaf_module(m, qualname):
            return True
        if _has_hooks(m):
            self.hooked.add(qualname)
            return True
        return False


def _trace(module: nn.Module, training: bool) -> Tuple[fx.Graph, Set[str]]:
    """The graph of module.forward with every module of the tree in `training` mode (restored
    after), and the submodules left as calls because they have hooks."""
    modes = [(m, m.training) for m in module.modules()]
    tracer = _Tracer()
    try:
        module.train(training)
        return tracer.trace(module), tracer.hooked
    finally:
        for m, mode in modes:
            m.training = mode


# ----------------------------------------------------------------------------- installing
def _compile_forward(graph: fx.Graph, tag: str):
    code = graph.python_code(root_module="self")
    filename = f"<fasthg.accelerate {tag}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)  # tracebacks show it
    scope = dict(code.globals)
    exec(compile(code.src, filename, "exec"), scope)
    return scope["forward"]


def _install(module: nn.Module, graphs: Dict[bool, fx.Graph], options: _Options, path: str) -> None:
    orig = type(module)
    tag = f"{orig.__qualname__} {path or '<model>'}"
    fwd = {mode: _compile_forward(g, f"{tag} {'train' if mode else 'eval'}") for mode, g in graphs.items()}
    if len(fwd) == 1:
        forward = next(iter(fwd.values()))
    else:
        fwd_train, fwd_eval = fwd[True], fwd[False]

        def forward(self, *args, **kwargs):
            return (fwd_train if self.training else fwd_eval)(self, *args, **kwargs)
    module.__class__ = type(orig.__name__, (orig,), {
        "forward": forward, "_fasthg_orig_cls": orig, "__reduce_ex__": _reduce_ex,
        "__module__": orig.__module__, "__qualname__": orig.__qualname__})
    module._fasthg_accelerate = options


def _reduce_ex(self, protocol):
    # The generated class is not importable: pickle/deepcopy the original class's object and
    # re-trace it when loading (its submodules come back accelerated on their own).
    return _rebuild, (type(self)._fasthg_orig_cls, self.__dict__)


_KEEP = object()  # (as process_group: leave the BNReLUs' settings as they are)


def _rebuild(cls, state):
    module = cls.__new__(cls)
    module.__dict__.update(state)
    options = state["_fasthg_accelerate"]
    _accelerate_traceable(module, _graphs(module), "", options, Report(), options.fused, process_group=_KEEP)
    return module


def _restore(model: nn.Module) -> Set[Tuple[str, str, str]]:
    """Puts every accelerated module of the tree back to its original class (its BNReLUs stay)
    and returns what was fused before, as (module path, kind, node name)."""
    before = set()
    for path, m in model.named_modules():
        orig = getattr(type(m), "_fasthg_orig_cls", None)
        if orig is not None:
            before |= {(path,) + key for key in m.__dict__.pop("_fasthg_accelerate").fused}
            m.__class__ = orig
    return before


# ----------------------------------------------------------------------------- patterns
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_UPSAMPLE_FUNCTIONS = {F.interpolate, F.upsample, F.upsample_nearest}
_ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}
# Producers of a fresh tensor (never a view of another): a `+=` onto their output mutates nothing else.
_FRESH_FUNCTIONS = {operator.add, operator.sub, operator.mul, torch.add, torch.cat, F.interpolate,
                    upsample_add_2x, ops.upsample_add}
_FRESH_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.Upsample, nn.Linear)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"{type(root.get_submodule(node.target)).__name__} ({node.target})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


def _is_relu_of(node: fx.Node, x: fx.Node, root: nn.Module) -> Optional[str]:
    """None if `node` is relu(x) with nothing else, else why not."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if not isinstance(m, nn.ReLU):
            return f"followed by {_describe(node, root)}, not a ReLU"
        if _has_hooks(m):
            return f"its ReLU ({node.target}) has hooks"
        return None if node.args == (x,) and not node.kwargs else "ReLU called with other arguments"
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        extra = set(node.kwargs) - {"inplace"}
        return None if node.args[:1] == (x,) and len(node.args) <= 2 and not extra else "relu with other arguments"
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return None if node.args == (x,) and not node.kwargs else "relu with other arguments"
    return f"followed by {_describe(node, root)}, not a ReLU"


def _bn_sites(root: nn.Module, graphs: Dict[bool, fx.Graph], skip: Set[str]):
    """{BN target: [(graph mode, bn node, relu node or None, reason or None)]} over all graphs,
    but the BNs in `skip` (those the BN-add-ReLU pass reported)."""
    sites: Dict[str, list] = {}
    for mode, g in graphs.items():
        for node in g.nodes:
            if (node.op != "call_module" or node.target in skip
                    or not isinstance(root.get_submodule(node.target), nn.BatchNorm2d)):
                continue
            users = list(node.users)
            if len(users) != 1:
                sites.setdefault(node.target, []).append(
                    (mode, node, None, f"its output has {len(users)} users, not only a ReLU"))
                continue
            why = _is_relu_of(users[0], node, root)
            sites.setdefault(node.target, []).append((mode, node, None if why else users[0], why))
    return sites


def _module_guard(m: nn.Module, names, sites, pattern: str) -> Optional[str]:
    """Why a BatchNorm2d cannot become a fused module (None if it can), `sites` its calls
    as (graph mode, ..., reason the call does not fit or None)."""
    why = next((s[-1] for s in sites if s[-1]), None)
    if type(m) is not nn.BatchNorm2d:
        return f"{type(m).__name__} is a subclass of BatchNorm2d (its forward may differ)"
    if _has_hooks(m):
        return "the BatchNorm2d has hooks"
    if len(names.get(id(m), ())) > 1:
        return f"the module is shared under several names: {', '.join(names[id(m)])}"
    calls = sum(s[0] for s in sites)
    if why and calls > 1:
        return f"called {calls} times, not every call followed only by {pattern}: " + why
    return why


def _make_fused(m: nn.BatchNorm2d, cls, options, process_group) -> None:
    """m becomes a `cls` in place (the same object, hence the same parameters and buffers),
    with accelerate's backend and sync settings (kept as they are when rebuilding)."""
    if not isinstance(m, cls):
        m.__class__ = cls
    if process_group is not _KEEP:
        m.backend, m.sync, m.process_group = options.backend, options.sync_bn, process_group


def _rewrite_bn_relu(root, graphs, path, options, report, names, process_group, skip):
    for target, sites in _bn_sites(root, graphs, skip).items():
        m = root.get_submodule(target)
        where = _join(path, target)
        already = isinstance(m, BNReLU)
        why = None if already else _module_guard(m, names, sites, "a ReLU")
        if why and not already:
            report.append(Change("bn_relu", where, "left alone", why))
            continue
        _make_fused(m, BNReLU, options, process_group)
        for _, bn_node, relu_node, _ in sites:
            if relu_node is not None:  # relu(relu(y)) == relu(y): after a BNReLU the ReLU goes
                relu_node.replace_all_uses_with(bn_node)
                relu_node.graph.erase_node(relu_node)
        report.append(Change("bn_relu", where, "already fused" if already else "fused",
                             "already a fasthg BNReLU" if already else "BatchNorm2d + ReLU -> BNReLU (same tensors)"))


def _bn_add_relu_site(node: fx.Node, root: nn.Module):
    """For a BatchNorm2d call whose only user is an addition: (add node, residual node, relu
    node, reason or None); None when the BN's output is not (only) added to something."""
    users = list(node.users)
    add = _add_operands(users[0]) if len(users) == 1 else None
    if add is None:
        return None
    a, b, in_place = add
    add_node = users[0]
    residual = b if a is node else a
    if a is b:
        return add_node, residual, None, "added to itself"
    if not isinstance(residual, fx.Node):
        return add_node, residual, None, f"added to a constant ({residual!r}), not a residual tensor"
    if a is not node and _is_bn_add_candidate(a, add_node, root):
        return add_node, residual, None, f"the other addend ({a.target}) is fused with the addition"
    if in_place and a is residual and not (_is_fresh(residual, root) and _only_read_before(residual, add_node)):
        return add_node, residual, None, "+= onto a residual that may be an input, a view or used elsewhere"
    sum_users = list(add_node.users)
    if len(sum_users) != 1:
        return add_node, residual, None, f"the sum has {len(sum_users)} users, not only a ReLU"
    why = _is_relu_of(sum_users[0], add_node, root)
    return add_node, residual, None if why else sum_users[0], why and f"the sum is {why}"


def _is_bn_add_candidate(node, add_node: fx.Node, root: nn.Module) -> bool:
    """Whether `node` is a BatchNorm2d (or BNAddReLU) call whose only user is `add_node`."""
    return (isinstance(node, fx.Node) and node.op == "call_module" and len(node.args) == 1
            and type(root.get_submodule(node.target)) in (nn.BatchNorm2d, BNAddReLU) and list(node.users) == [add_node])


def _rewrite_bn_add_relu(root, graphs, path, options, report, names, process_group) -> Set[str]:
    """BatchNorm2d -> add -> ReLU -> a BNAddReLU call (x, residual). Returns the BN targets it
    reported (fused or left alone), which the BN-ReLU pass then skips."""
    sites: Dict[str, list] = {}  # BN target: [(graph mode, graph, bn node, add, residual, relu, reason)]
    for mode, g in graphs.items():
        for node in g.nodes:
            if node.op != "call_module" or not isinstance(root.get_submodule(node.target), nn.BatchNorm2d):
                continue
            if isinstance(root.get_submodule(node.target), BNReLU) or len(node.args) != 1 or node.kwargs:
                continue
            found = _bn_add_relu_site(node, root)
            if found is not None:
                sites.setdefault(node.target, []).append((mode, g, node) + found)
    for target, calls in sites.items():
        m = root.get_submodule(target)
        where = _join(path, target)
        already = isinstance(m, BNAddReLU)
        why = None if already else _module_guard(m, names, calls, "an addition and a ReLU")
        if why:
            report.append(Change("bn_add_relu", where, "left alone", why))
            continue
        _make_fused(m, BNAddReLU, options, process_group)
        for _, g, bn_node, add_node, _, relu_node, _ in calls:
            a, b, _ = _add_operands(add_node)  # read now: an earlier rewrite may have replaced the residual
            residual = b if a is bn_node else a
            # at the addition: the residual may be computed after the BN (torchvision's downsample)
            with g.inserting_before(add_node):
                fused = g.call_module(target, (bn_node.args[0], residual))
            relu_node.replace_all_uses_with(fused)
            for done in (relu_node, add_node, bn_node):
                g.erase_node(done)
        report.append(Change("bn_add_relu", where, "already fused" if already else "fused",
                             "already a fasthg BNAddReLU" if already else
                             "BatchNorm2d + add + ReLU -> BNAddReLU (same tensors)"))
    return set(sites)


def _interpolate_args(node: fx.Node) -> dict:
    sig = inspect.signature(F.interpolate)
    bound = sig.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _upsample_of(node: fx.Node, root: nn.Module):
    """(input node, size or None, None) for a nearest upsampling with scale 2 or a size,
    (None, None, reason) for another upsampling, None for anything else."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if not isinstance(m, nn.Upsample):
            return None
        if type(m) not in (nn.Upsample, nn.UpsamplingNearest2d) or _has_hooks(m):
            return None, None, f"{type(m).__name__} is a subclass or has hooks"
        args = {"input": node.args[0] if node.args else node.kwargs.get("input"), "size": m.size,
                "scale_factor": m.scale_factor, "mode": m.mode, "align_corners": m.align_corners}
    elif node.op == "call_function" and node.target in _UPSAMPLE_FUNCTIONS:
        if node.target is F.interpolate:
            args = _interpolate_args(node)
        else:  # F.upsample(input, size, scale_factor, mode), F.upsample_nearest(input, size, scale_factor)
            names = ["input", "size", "scale_factor", "mode"]
            args = {"size": None, "scale_factor": None, "mode": "nearest", **dict(zip(names, node.args)),
                    **node.kwargs}
    else:
        return None
    if args["mode"] != "nearest":
        return None, None, f"mode {args['mode']!r}, not 'nearest'"
    if args.get("align_corners") is not None:
        return None, None, "align_corners given (an error for mode 'nearest')"
    if args.get("antialias"):
        return None, None, "antialias=True"
    if args["size"] is not None:
        return args["input"], args["size"], None  # checked at run time: twice the input's size
    scale = args["scale_factor"]
    if not isinstance(scale, (int, float, tuple, list)) or any(s != 2 for s in _pair_scale(scale)):
        return None, None, f"scale_factor {scale!r}, not 2"
    return args["input"], None, None


def _pair_scale(scale):
    return (scale, scale) if isinstance(scale, (int, float)) else tuple(scale)


def _add_operands(node: fx.Node):
    """(a, b, in_place) when `node` is a + b (no alpha, no out), else None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        if len(node.args) != 2 or any(k not in ("alpha",) for k in node.kwargs) or node.kwargs.get("alpha", 1) != 1:
            return None
        return node.args[0], node.args[1], node.target is operator.iadd
    if node.op == "call_method" and node.target in ("add", "add_"):
        if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1 or set(node.kwargs) - {"alpha"}:
            return None
        return node.args[0], node.args[1], node.target == "add_"
    return None


def _is_fresh(node, root) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _FRESH_MODULES)
    return node.op == "call_function" and node.target in _FRESH_FUNCTIONS


_METADATA = {"shape", "dtype", "device", "ndim"}


def _only_read_before(skip: fx.Node, iadd: fx.Node) -> bool:
    """True when every other user of `skip` reads only its metadata (shape, dtype...), so
    turning `skip += up` out of place changes what nobody sees."""
    for user in skip.users:
        if user is iadd:
            continue
        if user.op == "call_function" and user.target is getattr and user.args[1:] and user.args[1] in _METADATA:
            continue
        if user.op == "call_method" and user.target in ("size", "dim"):
            continue
        return False
    return True


def _note_once(report, seen, change):
    """Reports `change` once per place: a module's graphs (one per traced mode) hold the same
    places."""
    if change.where not in seen:
        report.append(change)
    seen.add(change.where)


def _note_fused(report, seen, before, path, op, node_name, where, how):
    done = (path, op, node_name) in before
    _note_once(report, seen, Change(op, where, "already fused" if done else "fused", how))


def _rewrite_upsample_add(root, graphs, path, options, report, before):
    seen = set()
    for g in graphs.values():
        for node in list(g.nodes):
            found = _upsample_of(node, root)
            if found is None:
                continue
            low, size, why = found
            users = list(node.users)
            add = _add_operands(users[0]) if len(users) == 1 else None
            if why is None and len(users) != 1:
                why = f"its result has {len(users)} users, not only an addition"
            elif why is None and add is None:
                why = f"its result feeds {_describe(users[0], root)}, not a plain addition"
            elif why is None:
                a, b, in_place = add
                skip = b if a is node else a
                if a is b:
                    why = "added to itself"
                elif in_place and a is skip and not (_is_fresh(skip, root) and _only_read_before(skip, users[0])):
                    why = "+= onto a tensor that may be an input, a view or used elsewhere"
            where = f"{_join(path, '') or '<model>'}:{node.name}"
            if why:
                _note_once(report, seen, Change("upsample_add", where, "left alone", why))
                continue
            add_node = users[0]
            with g.inserting_before(add_node):
                fused = g.call_function(upsample_add_2x, (low, skip, size, options.backend, a is node))
            add_node.replace_all_uses_with(fused)
            g.erase_node(add_node)
            g.erase_node(node)
            options.fused.add(("upsample_add", node.name))
            _note_fused(report, seen, before, path, "upsample_add", node.name, where,
                        "nearest 2x upsample + add -> upsample_add (run-time shape check; other shapes run the "
                        "original ops)" + (" (size given)" if size is not None else ""))


def _rewrite_bn_relu_conv(root, graphs, path, options, report, before):
    """After _rewrite_bn_relu: BNReLU -> Conv2d (the BN-ReLU output used by the conv only)."""
    seen = set()
    for g in graphs.values():
        for node in list(g.nodes):
            if node.op != "call_module" or not isinstance(root.get_submodule(node.target), BNReLU):
                continue
            users = list(node.users)
            if len(users) != 1 or users[0].op != "call_module":
                continue
            conv_node = users[0]
            bn, conv = root.get_submodule(node.target), root.get_submodule(conv_node.target)
            if not isinstance(conv, nn.Conv2d):
                continue
            where = f"{_join(path, node.target)} -> {conv_node.target}"
            why = None
            if not is_plain(conv) or _has_hooks(conv):
                why = f"{type(conv).__name__} is a subclass of Conv2d or has hooks"
            elif conv_node.args != (node,) or conv_node.kwargs:
                why = "the convolution is called with other arguments"
            else:
                try:
                    check_modules(bn, conv)
                except ValueError as e:
                    why = str(e)
            if why:
                _note_once(report, seen, Change("bn_relu_conv", where, "left alone", why))
                continue
            with g.inserting_before(conv_node):
                unit = g.call_function(ops.bn_relu_conv, (node.args[0], g.get_attr(node.target),
                                                          g.get_attr(conv_node.target), options.backend))
            conv_node.replace_all_uses_with(unit)
            g.erase_node(conv_node)
            g.erase_node(node)
            options.fused.add(("bn_relu_conv", conv_node.name))
            _note_fused(report, seen, before, path, "bn_relu_conv", conv_node.name, where,
                        "BNReLU + Conv2d -> bn_relu_conv (recomputes relu(bn(x)) in backward)")


# ----------------------------------------------------------------------------- the passes
def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def _graphs(module: nn.Module, hooked: Optional[Set[str]] = None) -> Dict[bool, fx.Graph]:
    """The training and eval graphs; one entry when the forward does not read self.training.
    Adds to `hooked` the submodules left as calls because they have hooks."""
    (train, hooked_train), (evaluation, hooked_eval) = _trace(module, True), _trace(module, False)
    if hooked is not None:
        hooked |= hooked_train | hooked_eval
    if train.python_code("self").src == evaluation.python_code("self").src:
        return {True: train}
    return {True: train, False: evaluation}


def _accelerate_traceable(module, graphs, path, options, report, before, process_group):
    names: Dict[int, List[str]] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    snapshot = {mode: g.python_code("self").src for mode, g in graphs.items()}
    done = _rewrite_bn_add_relu(module, graphs, path, options, report, names, process_group)
    _rewrite_bn_relu(module, graphs, path, options, report, names, process_group, done)
    _rewrite_upsample_add(module, graphs, path, options, report, before)
    if options.memory == "recompute":
        _rewrite_bn_relu_conv(module, graphs, path, options, report, before)
    for g in graphs.values():
        g.lint()
    if any(g.python_code("self").src != snapshot[mode] for mode, g in graphs.items()):
        _install(module, graphs, options, path)


def _accelerate_sequential(seq: nn.Sequential, path, options, report, process_group):
    """Module-level BN-ReLU fusion in an nn.Sequential that fx cannot trace."""
    children = list(seq._modules.items())
    for (name, m), (rname, r) in zip(children, children[1:]):
        if isinstance(m, BNReLU) and type(r) is nn.Identity:  # fused by an earlier call
            report.append(Change("bn_relu", _join(path, name), "already fused", "already a fasthg BNReLU"))
            _make_fused(m, BNReLU, options, process_group)
            continue
        if not isinstance(r, nn.ReLU) or _has_hooks(r) or not isinstance(m, nn.BatchNorm2d):
            continue
        if type(m) is nn.BatchNorm2d and not _has_hooks(m):
            report.append(Change("bn_relu", _join(path, name), "fused", "BatchNorm2d + ReLU in an nn.Sequential"))
        elif isinstance(m, BNReLU):
            report.append(Change("bn_relu", _join(path, name), "already fused", "already a fasthg BNReLU"))
        else:
            continue
        _make_fused(m, BNReLU, options, process_group)
        setattr(seq, rname, nn.Identity())


def _accelerate_module(module, path, options_of, report, before, process_group):
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        for name, child in module.named_children():
            _accelerate_module(child, _join(path, name), options_of, report, before, process_group)
        return
    hooked = set()
    try:
        graphs = _graphs(module, hooked)
    except Exception as e:  # noqa: BLE001  (whatever fx raises, the submodules are tried instead)
        if not any(True for _ in module.children()):
            return
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        report.append(Change("trace", path or "<model>", "traced submodules",
                             f"torch.fx cannot trace it ({type(e).__name__}: {first[:120]}); "
                             "accelerating its submodules instead"))
        if type(module).forward is nn.Sequential.forward:
            _accelerate_sequential(module, path, options_of(), report, process_group)
        for name, child in module.named_children():
            _accelerate_module(child, _join(path, name), options_of, report, before, process_group)
        return
    _accelerate_traceable(module, graphs, path, options_of(), report, before, process_group)
    for name in sorted(hooked):  # called as modules: their forwards are accelerated on their own
        _accelerate_module(module.get_submodule(name), _join(path, name), options_of, report, before, process_group)


def accelerate(model: nn.Module, backend: str = "auto", memory: str = "default", sync_bn: bool = False,
               process_group=None, return_report: bool = False, channels_last="auto"):
    """Replaces, in place, the patterns of `model` that fasthg has fused ops for (see the module
    docstring) and returns `model`, or `(model, report)` with return_report=True (a Report:
    a list of Change, printable as a table). state_dict keys and values are unchanged; calling
    it again changes nothing more (its report says "already fused").

    backend: the fused ops' backend ("auto", "eager", "native", "triton"), set on every BNReLU
    it finds (those the model had included). memory="recompute":
    BN-ReLU -> Conv2d runs as fasthg.ops.bn_relu_conv, which keeps x and the BN statistics for
    the backward instead of the activation (less memory, one more pass). sync_bn=True: the
    fused BN-ReLUs merge their training statistics over `process_group` (default: all
    processes), like nn.SyncBatchNorm (for DistributedDataParallel). channels_last ("auto", True
    or False): the model's 4-D parameters and inputs channels_last, its 4-D outputs given back
    NCHW after NCHW inputs (fasthg.fuse.channels_last); "auto" does it for a CPU model with
    convolutions."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: `model` must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"accelerate: `backend` must be one of {ops.BACKENDS}, got {backend!r}")
    if memory not in MEMORY_MODES:
        raise ValueError(f"accelerate: `memory` must be one of {MEMORY_MODES}, got {memory!r}")
    if not isinstance(sync_bn, bool):
        raise ValueError(f"accelerate: `sync_bn` must be True or False, got {sync_bn!r}")
    to_channels_last = layout.wanted(model, channels_last)
    before = _restore(model)
    report = Report()
    _accelerate_module(model, "", lambda: _Options(backend, memory, sync_bn), report, before, process_group)
    _convs_on_fasthg(model, backend, report)
    if to_channels_last:
        action = "already channels_last" if layout.has_it(model) else "channels_last"
        layout.convert(model)
        report.append(Change("layout", "<model>", action,
                             "4-D parameters and inputs channels_last, outputs NCHW after NCHW inputs"))
    return (model, report) if return_report else model


def _convs_on_fasthg(model: nn.Module, backend: str, report: Report) -> None:
    """Every nn.Conv2d of the tree (not a subclass) becomes a fasthg.nn.Conv2d in place (the
    same object: parameters, hooks and state_dict unchanged), those already one take `backend`."""
    for path, m in model.named_modules():
        if type(m) is nn.Conv2d:
            m.__class__ = Conv2d
            action = CONV_ACTION
        elif type(m) is Conv2d:
            action = "already " + CONV_ACTION
        else:
            continue
        m.backend = backend
        report.append(Change("conv2d", path or "<model>", action,
                             "fasthg.nn.Conv2d: its backward on fasthg.ops.conv2d where that applies"))


__all__ = ["Change", "Report", "accelerate", "upsample_add_2x"]
