"""The order training people are seen in: one permutation per (seed, epoch), sliced by rank."""
import torch


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of a permutation that depends only on (seed, epoch), from a given
    position: the data order of a resumed run is the uninterrupted run's. Global batch k is
    perm[k*B*W:(k+1)*B*W] whatever the number of processes W; rank r takes its r-th B."""

    def __init__(self, n: int, seed: int, batch_size: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.batch_size, self.rank, self.world = n, seed, batch_size, rank, world
        self.epoch, self.start = 0, 0
        self.steps = n // (batch_size * world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[:self.steps * self.batch_size * self.world]
        mine = perm.view(self.steps, self.world, self.batch_size)[:, self.rank].reshape(-1)
        return iter(mine[self.start:].tolist())

    def __len__(self):
        return self.steps * self.batch_size - self.start
