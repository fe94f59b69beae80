"""Model-level fusions: fasthg.accelerate (fused ops in a model the user already has, torch.fx) and
folded inference (fasthg.fuse.for_inference)."""
from fasthg.fuse.accelerate import accelerate  # noqa: F401
from fasthg.fuse.inference import for_inference  # noqa: F401
