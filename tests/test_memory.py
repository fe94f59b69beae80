"""The memory counters the benchmarks report, on cases worked out by hand."""
import torch

from fasthg.bench.memory import peak_bytes, saved_activation_bytes

MB = 1 << 20


def test_peak_counts_temporaries_and_not_in_place_ops_or_views():
    x = torch.randn(MB // 4)  # 1 MiB of float32

    def fn():
        y = x * 2             # +1 MiB
        y.add_(1).relu_()     # in place: nothing new
        v = y.view(-1, 2)[0]  # a view: nothing new
        z = y + v.sum()       # +1 MiB (and a scalar); peak 2 MiB
        del y, v
        return z.exp()        # y is gone: 2 MiB live again

    assert 2 * MB <= peak_bytes(fn, "cpu") < 2 * MB + 1024


def test_peak_of_a_loop_that_frees_is_one_step():
    x = torch.randn(MB // 4)

    def fn():
        for _ in range(5):
            x.mul(3)          # each result dies at once

    assert MB <= peak_bytes(fn, "cpu") < MB + 1024


def test_saved_activations_exclude_parameters_and_count_each_tensor_once():
    lin = torch.nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256, requires_grad=True)

    def fn():
        h = lin(x)            # saves x (the weight is a parameter)
        return (h * h).sum()  # saves h once, though it is used twice

    assert saved_activation_bytes(fn, lin.parameters()) == 2 * 64 * 256 * 4
