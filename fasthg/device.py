"""The device a command or the trainer runs on: "auto" is CUDA where there is a GPU, else the CPU."""
import torch


def resolve(name: str) -> torch.device:
    """torch.device for "auto", "cpu", "cuda", "cuda:1", ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
