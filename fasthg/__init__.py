"""fasthg: Stacked Hourglass pose networks trained faster with fused CUDA/C++/Triton kernels."""
__version__ = "0.1.0"

from fasthg import ops  # noqa: E402,F401  (loads fasthg._C and registers the ops)
from fasthg import fuse  # noqa: E402,F401
from fasthg.fuse import accelerate  # noqa: E402,F401
