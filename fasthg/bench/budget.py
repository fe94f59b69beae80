"""The largest batch whose activations fit a memory budget, from the bytes autograd saves for
backward (fasthg.bench.memory): they grow linearly with the batch, so two batches measured
give the bytes per image and the batch-independent rest, and the budget gives the batch.
(Activations only: weights, gradients, optimizer state and the backward's temporaries come on top.)"""
from typing import Dict, List, Sequence

import torch

from fasthg.bench import memory
from fasthg.models import PRESETS


def model_spec(name: str):
    """A model benchmark's backend name: "native" or "native+recompute" -> (backend, memory)."""
    backend, _, mem = name.partition("+")
    return backend, mem or "default"


def saved_bytes(preset: str, spec: str, batches: Sequence[int], image_size: int, device,
                dtype=torch.float32, layout=torch.contiguous_format) -> Dict[int, int]:
    """{batch: bytes saved for backward by one training forward} of a preset built as `spec`."""
    backend, mem = model_spec(spec)
    torch.manual_seed(0)
    model = PRESETS[preset](backend=backend, memory=mem).to(device).to(memory_format=layout)
    dev = torch.device(device).type
    out = {}
    for n in batches:
        images = torch.randn(n, 3, image_size, image_size, device=device).contiguous(memory_format=layout)
        with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
            out[n] = memory.saved_activation_bytes(lambda: model(images), model.parameters())
    return out


def largest_batch(saved: Dict[int, int], budget_bytes: float) -> int:
    """From two (batch, bytes) points: the largest batch whose saved bytes fit the budget."""
    (b1, s1), (b2, s2) = sorted(saved.items())[:2]
    per_image = (s2 - s1) / (b2 - b1)
    fixed = s1 - b1 * per_image
    return max(0, int((budget_bytes - fixed) // per_image))


def budget_rows(preset: str, specs: Sequence[str], image_size: int, device, budgets_gib=(16, 80),
                batches=(2, 4), dtype=torch.float32) -> List[dict]:
    """Per spec: saved MiB per image and the largest batch per budget (GiB), with the drop in
    saved bytes against the first spec (eager) at the larger measured batch."""
    rows, first = [], None
    for spec in specs:
        saved = saved_bytes(preset, spec, batches, image_size, device, dtype)
        top = saved[max(batches)]
        first = first or top
        rows.append({"model": preset, "backend": spec, "image_size": image_size, "batches": list(batches),
                     "saved_mb": {str(b): s / 2**20 for b, s in saved.items()},
                     "per_image_mb": (saved[max(batches)] - saved[min(batches)]) / (max(batches) - min(batches)) / 2**20,
                     "drop": 1 - top / first,
                     "largest_batch": {str(g): largest_batch(saved, g * 2**30) for g in budgets_gib}})
    return rows


def table(rows: List[dict]) -> List[str]:
    if not rows:
        return []
    budgets = list(rows[0]["largest_batch"])
    batches = rows[0]["batches"]
    lines = ["", f"Activation budget (bytes saved for backward, measured at batches {' and '.join(map(str, batches))}, "
                 "extrapolated linearly; activations only):",
             "| model | backend | " + " | ".join(f"saved MB @ {b}" for b in batches) + " | MB per image | drop vs "
             f"{rows[0]['backend']} | " + " | ".join(f"largest batch in {g} GiB" for g in budgets) + " |",
             "|---" * (4 + len(batches) + len(budgets)) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} {r['image_size']}x{r['image_size']} | {r['backend']} | "
                     + " | ".join(f"{r['saved_mb'][str(b)]:.1f}" for b in batches)
                     + f" | {r['per_image_mb']:.1f} | {r['drop']:.1%} | "
                     + " | ".join(str(r["largest_batch"][g]) for g in budgets) + " |")
    return lines
