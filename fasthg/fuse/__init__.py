"""Model-level fusions: folded inference (fasthg.fuse.for_inference)."""
from fasthg.fuse.inference import for_inference  # noqa: F401
