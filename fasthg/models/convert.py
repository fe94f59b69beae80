"""Checkpoints people already have, as fasthg StackedHourglass models: `from_checkpoint(path)`.

Reads, and tells apart by their contents:
- fasthg's own (fasthg.checkpoint: its format, model config and weights);
- the authors' PyTorch port, princeton-vl/pytorch_stacked_hourglass: {"state_dict",
  "optimizer", "epoch"}, the network (its PoseNet) under "model.module." (the training
  wrapper, then DataParallel). Its blocks match fasthg's one for one: the stem `pre`
  (conv-BN-ReLU 7x7, residuals 64->128, pool, 128->128, 128->F), hourglasses `hgs.i.0` of
  depth 4 (up1, low1, low2 recursing, low3; nearest 2x upsample + add), `features.i`
  (residual, then a 1x1 conv-BN-ReLU), `outs.i` (1x1 conv to heatmaps) and the
  `merge_features.i` / `merge_preds.i` 1x1 convs added into the next stack's input. Its
  residuals carry a `skip_layer` even where input and output widths are equal; its forward
  does not use it there (identity skip), so those tensors are dropped knowingly. Hourglasses
  built with `increase` > 0 (wider inner levels) have no fasthg counterpart and are refused;
- pytorch-pose (bearpaw): {"epoch", "arch", "state_dict", "best_acc", "optimizer"}, the
  network (its HourglassNet) under "module." (DataParallel): stem conv1/bn1, layer1
  (residual 64->128), pool, layer2 (128->256), layer3 (256->F; F = 256 as published),
  fasthg's stem="pytorch-pose";
  hourglass `hg.i.hg[n]` per level n (n = depth-1 outermost), [0] up1, [1] low1, [2] low3,
  [3] (innermost level only) low2; `res.i` and `fc.i` (1x1 conv, BN, ReLU) the features,
  `score.i` the heatmaps, `fc_.i` / `score_.i` the convs into the next stack. Its residual
  modules per place (--blocks N: `[j]` is a row of N, `.0` to `.N-1`, in every hourglass place
  and `res.i`) become fasthg's num_blocks.
A bare state_dict of either (no wrapper dict) loads too, as does a fasthg model's (its config
then inferred like theirs, with no input_norm); wrapper prefixes "module.",
"model." and torch.compile's "_orig_mod." are stripped wherever all keys share them.

Stack count, feature width, joint count and hourglass depth come from the tensors' names
and shapes. Every tensor is mapped: keys that map to nothing, keys missing, and shapes that
differ are refused with a ValueError naming them, as is a file that is not a checkpoint
(truncated, text, ...) or holds another network (a classifier, another pose network).

Inputs. fasthg feeds RGB images as pixel / 255 - 0.5, [B, 3, H, W]. The authors' port was
trained on RGB pixel / 255 in NHWC; pytorch-pose on RGB pixel / 255 minus its training set's
per-channel mean (its data/<set>/mean.pth.tar; not in the checkpoint, so give it as
`input_mean`, else fasthg's 0.5 stands in, with a warning). The converted model records that
preprocessing in its config (`input_norm`) and applies it to fasthg's input itself, so
`fasthg eval`/`predict` and a model call with fasthg's [B, 3, H, W] images give the heatmaps
the original network gives on its own input.

Files are read with PyTorch's safe unpickler (fasthg.safe_load): nothing in a file runs. A
file that needs a class the safe loader refuses is refused naming it; `trust=True` unpickles
it fully, which runs whatever code it holds (only for files you trust)."""
import dataclasses
import os
import re
import warnings
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch

from fasthg.models.hourglass import StackedHourglass
from fasthg.safe_load import FORMAT, check_format, load_file

EXPECTED = ("expected a checkpoint that fasthg train wrote (e.g. runs/train/best.pt), or one of "
            "princeton-vl's pytorch_stacked_hourglass or bearpaw's pytorch-pose hourglass")
PRINCETON, PYTORCH_POSE, FASTHG = "pytorch_stacked_hourglass", "pytorch-pose", "fasthg"
_PRINCETON_ROOTS = ("pre", "hgs", "features", "outs", "merge_features", "merge_preds")
_PYTORCH_POSE_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "hg", "res", "fc", "score", "fc_", "score_")
_WRAPPERS = ("module", "model", "_orig_mod")
_CONV = ("weight", "bias")
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_SHOWN = 8  # keys named per kind of problem


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read and mapped onto fasthg's model: `kind` (fasthg, pytorch_stacked_hourglass,
    pytorch-pose), the StackedHourglass `config`, the weights under fasthg's names
    (`state_dict`), the file's whole dict (`contents`) and the peer's keys left out knowingly
    (`dropped`: the authors' port's unused skip_layer tensors)."""
    path: str
    kind: str
    config: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]
    contents: Any
    dropped: List[str]

    @property
    def input_size(self) -> int:
        """The input size the weights were trained at: fasthg's record, else both peers' 256."""
        return int(self.contents.get("input_size", 256)) if self.kind == FASTHG else 256


def from_checkpoint(path: str, backend: str = "auto", map_location="cpu",
                    input_mean: Union[None, str, Sequence[float]] = None, trust: bool = False) -> StackedHourglass:
    """A fasthg StackedHourglass with the weights of the checkpoint at `path` (fasthg's,
    princeton-vl's pytorch_stacked_hourglass or bearpaw's pytorch-pose; see the module's
    docstring), in eval mode; every tensor of the file maps, except the authors' port's
    skip_layer where a residual keeps its width (built there, never used by its forward:
    dropped). `map_location`: torch.load's (a device also receives the model).
    `input_mean`: for pytorch-pose, the per-channel RGB mean its training subtracted from
    pixel / 255 (3 floats, or the path of its mean.pth.tar). `trust=True`: unpickle the
    file(s) fully instead of safely, running any code they hold (see the module's docstring)."""
    return build(read_checkpoint(path, map_location, input_mean, trust), backend, map_location)


def build(ckpt: Checkpoint, backend: str = "auto", map_location="cpu", memory: str = "default") -> StackedHourglass:
    """The StackedHourglass of a read_checkpoint() result, in eval mode."""
    model = StackedHourglass(**ckpt.config, backend=backend, memory=memory)
    model.load_state_dict(ckpt.state_dict)
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval()


def read_checkpoint(path: str, map_location="cpu", input_mean: Union[None, str, Sequence[float]] = None,
                    trust: bool = False) -> Checkpoint:
    """The checkpoint at `path`, mapped onto fasthg's model (no model built yet)."""
    contents = load_file(path, map_location=map_location, trust=trust)  # its errors name fasthg's own kind
    return from_contents(path, contents, input_mean, trust)


def from_contents(path: str, contents: Any, input_mean: Union[None, str, Sequence[float]] = None,
                  trust: bool = False) -> Checkpoint:
    """A file's contents (as load_file gave them) mapped onto fasthg's model; `path` names it
    in errors. Every tensor is checked: names, shapes and dtypes (ValueError naming them),
    finite values (a warning naming them)."""
    if isinstance(contents, dict) and "format" in contents:
        check_format(path, contents)
        if input_mean is not None:
            raise ValueError(f"input_mean: {path} is a fasthg checkpoint, whose model takes fasthg's own input")
        config = contents.get("model_config")
        if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
            raise ValueError(f"{path}: a {FORMAT} checkpoint whose model_config is {type(config).__name__}, not a "
                             f"dict of settings (a damaged or hand-edited file)")
        if not isinstance(contents.get("model"), dict) or not contents["model"]:
            raise ValueError(f"{path}: a {FORMAT} checkpoint without its model's weights (its 'model' is "
                             f"{type(contents.get('model')).__name__}, not a state_dict; a damaged file)")
        state = _state_dict(path, {"state_dict": contents["model"]})
        mapped, _ = _map(state, None, dict(config), path, FASTHG, "")
        return Checkpoint(path, FASTHG, dict(config), mapped, contents, [])
    state, prefix = _strip_wrappers(_state_dict(path, contents))
    roots = {k.split(".", 1)[0] for k in state}
    if roots & {"hgs", "pre"}:
        kind, (config, pairs) = PRINCETON, _princeton(state, path)
        if input_mean is not None:
            raise ValueError(f"input_mean: {path} is a pytorch_stacked_hourglass checkpoint, trained on pixel / 255 "
                             "(no mean subtracted); input_mean is for pytorch-pose checkpoints")
        config["input_norm"] = {"mean": [0.0] * 3, "std": [1.0] * 3}
    elif {"hg", "score"} <= roots:
        kind, (config, pairs) = PYTORCH_POSE, _pytorch_pose(state, path, contents)
        config["stem"] = "pytorch-pose"
        if input_mean is None:
            warnings.warn(f"{path}: pytorch-pose subtracted its training set's mean colour (its "
                          "data/<set>/mean.pth.tar, not in the checkpoint) from pixel / 255; without input_mean "
                          "fasthg's 0.5 stands in for it",
                          stacklevel=3)
        else:
            config["input_norm"] = {"mean": _mean(input_mean, trust), "std": [1.0] * 3}
    elif {"stem", "hourglasses", "heads"} <= roots:  # fasthg's own model.state_dict(), without its config
        kind, config, pairs = FASTHG, _fasthg(state, path), None
        if input_mean is not None:
            raise ValueError(f"input_mean: {path} holds a fasthg model's weights, which take fasthg's own input")
    else:
        raise ValueError(f"{path}: a torch file but not a fasthg checkpoint, nor a stacked hourglass fasthg converts: "
                         f"its network's top-level modules are {_names(sorted(roots))}; the authors' "
                         f"pytorch_stacked_hourglass has {', '.join(_PRINCETON_ROOTS)}, pytorch-pose's hourglass "
                         f"{', '.join(_PYTORCH_POSE_ROOTS)} ({EXPECTED})")
    mapped, dropped = _map(state, pairs, config, path, kind, prefix)
    return Checkpoint(path, kind, config, mapped, contents, dropped)


# -- reading -----------------------------------------------------------------------------------

def _state_dict(path: str, contents: Any) -> Dict[str, torch.Tensor]:
    """The network's tensors: the dict's "state_dict", or the dict itself when it is one."""
    state = contents.get("state_dict") if isinstance(contents, dict) else None
    if state is None and isinstance(contents, dict) and contents and all(torch.is_tensor(v) for v in contents.values()):
        state = contents  # a bare state_dict
    if not isinstance(state, dict) or not state:
        what = f"a dict with keys {_names(sorted(map(str, contents)))}" if isinstance(contents, dict) else \
            f"a {type(contents).__name__}"
        raise ValueError(f"{path}: a torch file but not a fasthg checkpoint, nor a model checkpoint with a "
                         f"'state_dict' of tensors (it holds {what}; {EXPECTED})")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{path}: its state_dict holds entries that are not named tensors: {_names(bad)}")
    return state


def _strip_wrappers(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], str]:
    """The keys without the wrappers' prefix all of them share ("model.module.", "module.", ...)."""
    prefix = ""
    while True:
        heads = {k[len(prefix):].split(".", 1)[0] for k in state}
        head = heads.pop() if len(heads) == 1 else None
        if head not in _WRAPPERS or not all("." in k[len(prefix):] for k in state):
            break
        prefix += head + "."
    return {k[len(prefix):]: v for k, v in state.items()}, prefix


def _mean(value: Union[str, Sequence[float]], trust: bool = False) -> List[float]:
    """input_mean as 3 floats: given so, or read from pytorch-pose's mean.pth.tar ({'mean', 'std'})."""
    if isinstance(value, (str, os.PathLike)):
        file = str(value)
        stats = load_file(file, "expected pytorch-pose's mean.pth.tar, {'mean': 3 values, 'std': ...}", trust=trust)
        value = stats.get("mean") if isinstance(stats, dict) else None
        if value is None:
            raise ValueError(f"input_mean: {file} holds no 'mean' (expected pytorch-pose's mean.pth.tar)")
    try:
        mean = [float(v) for v in value]
    except (TypeError, ValueError):
        mean = []
    if len(mean) != 3:
        raise ValueError(f"input_mean must be 3 numbers (R, G, B means of pixel / 255) or pytorch-pose's mean.pth.tar, "
                         f"got {value!r}")
    return mean


def _names(keys: Sequence[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _indices(state: Dict[str, torch.Tensor], pattern: str) -> List[int]:
    """The sorted distinct integers that `pattern`'s group matches at the start of the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state for m in [rx.match(k)] if m})


def _shape(state, key: str, path: str, kind: str) -> torch.Size:
    if key not in state:
        raise ValueError(f"{path}: a {kind} checkpoint without {key!r}, which gives the model's shape "
                         f"(a truncated network or another one)")
    return state[key].shape


def _stacks(indices: List[int], root: str, path: str) -> int:
    if not indices or indices != list(range(len(indices))):
        raise ValueError(f"{path}: its hourglasses {root}.N are numbered {indices}, expected 0, 1, ...")
    return len(indices)


# -- the peers' layouts ---------------------------------------------------------------------------
# A layout is a list of (fasthg module, peer module, kind): kind "conv", "bn" or "res"
# (a residual: fasthg's body.0-5 and skip; the peer's names come with the peer).

def _fasthg(state, path):
    """The config of a bare fasthg state_dict (a config-less one has no input_norm)."""
    stacks = _stacks(_indices(state, r"heads\.(\d+)\."), "heads", path)
    joints, features = _shape(state, "heads.0.weight", path, FASTHG)[:2]
    depth = max(1, max(k.count("low2.") for k in state if k.startswith("hourglasses.0.")))
    stem = "pytorch-pose" if _shape(state, "stem.4.body.5.weight", path, FASTHG)[0] == 256 else "paper"
    blocks = len(_indices(state, r"features\.0\.0\.(\d+)\.body\.")) or 1  # numbered only when more than one
    return {"num_stacks": stacks, "num_features": int(features), "num_joints": int(joints), "depth": depth,
            "stem": stem, "num_blocks": blocks}


def _princeton(state, path):
    """(config, pairs) of the authors' PoseNet."""
    kind = PRINCETON
    stacks = _stacks(_indices(state, r"hgs\.(\d+)\."), "hgs", path)
    joints, features = _shape(state, "outs.0.conv.weight", path, kind)[:2]
    depth = max(k.count("low2.") for k in state if k.startswith("hgs.0.0."))
    depth = max(depth, 1)
    inner = _shape(state, "hgs.0.0.low1.conv3.conv.weight", path, kind)[0]
    if inner != features:
        raise ValueError(f"{path}: hourglasses built with increase={inner - features} (inner levels {inner} wide, "
                         f"outer {features}); fasthg's hourglass keeps one width (increase=0, the published setting)")
    pairs = [("stem.0", "pre.0.conv", "conv"), ("stem.1", "pre.0.bn", "bn"), ("stem.2", "pre.1", "res"),
             ("stem.4", "pre.3", "res"), ("stem.5", "pre.4", "res")]
    for i in range(stacks):
        fp, pp = f"hourglasses.{i}", f"hgs.{i}.0"
        for level in range(depth):
            pairs += [(f"{fp}.{name}", f"{pp}.{name}", "res") for name in ("up1", "low1", "low3")]
            fp, pp = fp + ".low2", pp + ".low2"
        pairs += [(fp, pp, "res"),
                  (f"features.{i}.0", f"features.{i}.0", "res"), (f"features.{i}.1", f"features.{i}.1.conv", "conv"),
                  (f"features.{i}.2", f"features.{i}.1.bn", "bn"), (f"heads.{i}", f"outs.{i}.conv", "conv")]
        if i < stacks - 1:
            pairs += [(f"remap_features.{i}", f"merge_features.{i}.conv.conv", "conv"),
                      (f"remap_heatmaps.{i}", f"merge_preds.{i}.conv.conv", "conv")]
    config = {"num_stacks": stacks, "num_features": int(features), "num_joints": int(joints), "depth": depth}
    return config, pairs


def _pytorch_pose(state, path, contents):
    """(config, pairs) of bearpaw's HourglassNet."""
    arch = contents.get("arch") if isinstance(contents, dict) else None
    kind = PYTORCH_POSE + (f" (arch {arch!r})" if arch else "")
    stacks = _stacks(_indices(state, r"hg\.(\d+)\."), "hg", path)
    joints, features = _shape(state, "score.0.weight", path, kind)[:2]
    depth = len(_indices(state, r"hg\.0\.hg\.(\d+)\."))
    blocks = len(_indices(state, r"res\.0\.(\d+)\."))
    if blocks < 1:
        raise ValueError(f"{path}: a {kind} checkpoint without res.0.0, whose residual modules give the model's shape "
                         f"(a truncated network or another one)")

    def places(fasthg_name, peer):  # a row of `blocks` residuals in both, fasthg's unnumbered when one
        return [(fasthg_name if blocks == 1 else f"{fasthg_name}.{b}", f"{peer}.{b}", "res") for b in range(blocks)]
    pairs = [("stem.0", "conv1", "conv"), ("stem.1", "bn1", "bn"), ("stem.2", "layer1.0", "res"),
             ("stem.4", "layer2.0", "res"), ("stem.5", "layer3.0", "res")]
    for i in range(stacks):
        fp = f"hourglasses.{i}"
        for level in range(depth):
            pp = f"hg.{i}.hg.{depth - 1 - level}"
            pairs += places(f"{fp}.up1", f"{pp}.0") + places(f"{fp}.low1", f"{pp}.1") + places(f"{fp}.low3", f"{pp}.2")
            fp = fp + ".low2"
        pairs += places(fp, f"hg.{i}.hg.0.3") + places(f"features.{i}.0", f"res.{i}")
        pairs += [(f"features.{i}.1", f"fc.{i}.0", "conv"),
                  (f"features.{i}.2", f"fc.{i}.1", "bn"), (f"heads.{i}", f"score.{i}", "conv")]
        if i < stacks - 1:
            pairs += [(f"remap_features.{i}", f"fc_.{i}", "conv"), (f"remap_heatmaps.{i}", f"score_.{i}", "conv")]
    config = {"num_stacks": stacks, "num_features": int(features), "num_joints": int(joints), "depth": depth,
              "num_blocks": blocks}
    return config, pairs


def _tensor_pairs(pairs, kind: str, skips: set):
    """(fasthg key, peer key) of every tensor, and the peer keys dropped knowingly. `skips`:
    fasthg's residuals that have a 1x1 skip conv (widths differ)."""
    out, dropped = [], []
    for fasthg_name, peer, what in pairs:
        if what == "conv":
            out += [(f"{fasthg_name}.{t}", f"{peer}.{t}") for t in _CONV]
        elif what == "bn":
            out += [(f"{fasthg_name}.{t}", f"{peer}.{t}") for t in _BN]
        else:
            wrap = ".conv" if kind == PRINCETON else ""  # the port's Conv holds its nn.Conv2d as .conv
            for j in range(3):  # body: BN-ReLU, conv, BN-ReLU, conv, BN-ReLU, conv
                out += [(f"{fasthg_name}.body.{2 * j}.{t}", f"{peer}.bn{j + 1}.{t}") for t in _BN]
                out += [(f"{fasthg_name}.body.{2 * j + 1}.{t}", f"{peer}.conv{j + 1}{wrap}.{t}") for t in _CONV]
            skip = f"{peer}.skip_layer.conv" if kind == PRINCETON else f"{peer}.downsample.0"
            if fasthg_name in skips:
                out += [(f"{fasthg_name}.skip.{t}", f"{skip}.{t}") for t in _CONV]
            elif kind == PRINCETON:  # built but unused by its forward when the widths are equal
                dropped += [f"{skip}.{t}" for t in _CONV]
    return out, dropped


def _map(state, pairs, config, path, kind, prefix):
    """fasthg's state_dict from the peer's, every key accounted for, else a ValueError naming them."""
    try:
        with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
            expected = StackedHourglass(**config, backend="eager").state_dict()
    except (TypeError, ValueError) as e:  # a config fasthg's model does not take
        raise ValueError(f"{path}: its model settings {config} make no fasthg StackedHourglass ({e})") from None
    skips = {k[:-len(".skip.weight")] for k in expected if k.endswith(".skip.weight")}
    tensor_pairs, dropped = _tensor_pairs(pairs, kind, skips) if kind != FASTHG else ([(k, k) for k in expected], [])
    if {f for f, _ in tensor_pairs} != set(expected):  # the layouts above and fasthg's model disagree
        raise RuntimeError(f"fasthg's {kind} layout does not cover its own model: "
                           f"{_names(sorted(set(expected) ^ {f for f, _ in tensor_pairs}))}")
    mapped, missing, shapes, dtypes = {}, [], [], []
    for fasthg_key, peer_key in tensor_pairs:
        if peer_key not in state:
            if peer_key.endswith("num_batches_tracked"):  # checkpoints of PyTorch before 0.4.1 lack it
                mapped[fasthg_key] = torch.zeros((), dtype=torch.long)
            else:
                missing.append(prefix + peer_key)
            continue
        tensor = state[peer_key]
        if tensor.shape != expected[fasthg_key].shape:
            shapes.append(f"{prefix}{peer_key} {tuple(tensor.shape)} (expected {tuple(expected[fasthg_key].shape)})")
        if _kind(tensor) != _kind(expected[fasthg_key]):  # load_state_dict would cast it silently
            dtypes.append(f"{prefix}{peer_key} {tensor.dtype} (expected {expected[fasthg_key].dtype})")
        mapped[fasthg_key] = tensor
    used = {p for _, p in tensor_pairs} | set(dropped)
    unexpected = [prefix + k for k in state if k not in used]
    if missing or unexpected or shapes or dtypes:
        shape = ", ".join(f"{k} {v}" for k, v in config.items())
        problems = [f"{what} ({len(keys)}): {_names(keys)}" for what, keys in
                    (("keys that map to nothing in it", unexpected), ("keys missing", missing),
                     ("shapes that differ", shapes), ("dtypes that differ", dtypes)) if keys]
        raise ValueError(f"{path}: does not map onto a fasthg StackedHourglass as a {kind} checkpoint of {shape}: "
                         + "; ".join(problems) + " (another network, another task's head, or a truncated state_dict)")
    _warn_non_finite(mapped, path)
    return mapped, [prefix + k for k in dropped if k in state]


def _kind(tensor: torch.Tensor) -> str:
    """What a tensor must be to stand for another: real floating point, integer, bool, complex."""
    if tensor.is_complex():
        return "complex"
    return "float" if tensor.is_floating_point() else ("bool" if tensor.dtype == torch.bool else "integer")


def _warn_non_finite(state: Dict[str, torch.Tensor], path: str) -> None:
    """A warning naming the weights that hold NaN or infinity (the model's outputs would too)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        warnings.warn(f"{path}: {len(bad)} tensors hold NaN or infinite values ({_names(bad)}); the model's "
                      f"outputs will not be finite (a diverged run's checkpoint?)", stacklevel=4)
