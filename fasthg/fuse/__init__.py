"""Graph-level fusion of models the user already has."""
from fasthg.fuse.accelerate import accelerate  # noqa: F401
