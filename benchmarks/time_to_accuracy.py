"""Time to accuracy of the main job: runs the default `fasthg train` (install excluded) and
reports the minutes of wall time to 90% PCKh@0.5 on the held-out synthetic people, and the
final PCKh. A benchmark, not a test: run it on a quiet machine.

    python benchmarks/time_to_accuracy.py                        # this checkout, default settings
    python benchmarks/time_to_accuracy.py --fresh-clone          # a git clone of HEAD, `make install`ed first
    python benchmarks/time_to_accuracy.py --seeds 0,1 --as-avx2  # two seeds, as on an AVX2-only CPU

--as-avx2 runs torch's and oneDNN's kernels at AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) in
float32 (--amp none, as the default picks on a CPU without bf16 instructions): an estimate of an
AVX2-only machine on a faster one, not a measurement of one. Extra arguments after `--` go to
`fasthg train`. The times are the log's elapsed_s: the run's wall time at the end of each epoch's
validation (start-up before the first step is not in it, and is printed apart).

Writes OUT/time_to_accuracy.json and .md (default OUT: runs/time_to_accuracy).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 90.0
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def summary(rows, wall_s):
    """A run's figures from its log rows; `hit` is the first validation at TARGET or above."""
    final = rows[-1]
    best = max(rows, key=lambda r: r["pckh_mean"])
    hit = next((r for r in rows if r["pckh_mean"] >= TARGET), None)
    images = [r["images_per_s"] for r in rows]
    wall = sum(r["train_s"] + r["val_s"] for r in rows)
    return {"minutes_to_90": hit["elapsed_s"] / 60 if hit else None, "epoch_at_90": hit["epoch"] if hit else None,
            "final_pckh": final["pckh_mean"], "best_pckh": best["pckh_mean"], "epochs": final["epoch"],
            "minutes_total": final["elapsed_s"] / 60, "process_wall_minutes": wall_s / 60,
            "median_images_per_s": sorted(images)[len(images) // 2],
            "data_share": sum(r["data_s"] for r in rows) / wall, "val_share": sum(r["val_s"] for r in rows) / wall}


def prepare_clone(dest):
    """A fresh clone of this checkout's HEAD at `dest`, installed by its own Makefile (not timed)."""
    subprocess.run(["git", "clone", "-q", ROOT, dest], check=True)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    subprocess.run(["make", "-C", dest, "install"], check=True, env=env)
    return os.path.join(dest, ".venv", "bin", "python")


def run_one(python, cwd, out, seed, as_avx2, extra):
    env = dict(os.environ, **(AVX2 if as_avx2 else {}))
    cmd = [python, "-m", "fasthg", "train", "--out", out, "--seed", str(seed)]
    cmd += (["--amp", "none"] if as_avx2 else []) + list(extra)
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, cwd=cwd, env=env, check=True)
    wall = time.time() - t
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return rows, wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one default run each (default: 0)")
    p.add_argument("--fresh-clone", action="store_true", help="run from a fresh clone of HEAD, installed first")
    p.add_argument("--as-avx2", action="store_true", help="kernels capped at AVX2, float32 (see above)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "time_to_accuracy"))
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    os.makedirs(args.out, exist_ok=True)
    python, cwd = sys.executable, ROOT
    if args.fresh_clone:
        clone = tempfile.mkdtemp(prefix="fasthg-clone-")
        python, cwd = prepare_clone(clone), clone
    info = subprocess.run([python, "-c", "from fasthg.device import cpu_description; print(cpu_description())"],
                          cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    commit = subprocess.run(["git", "-C", cwd, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows, wall = run_one(python, cwd, os.path.join(args.out, f"seed{seed}"), seed, args.as_avx2, extra)
        results.append({"seed": seed, **summary(rows, wall)})
    report = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "cpu": info, "as_avx2": args.as_avx2,
              "fresh_clone": args.fresh_clone, "extra_args": extra, "runs": results}
    lines = [f"Default `fasthg train` ({commit}, {report['date']}) on {info}"
             + (", its kernels capped at AVX2, float32" if args.as_avx2 else ""),
             "", "| seed | minutes to 90% PCKh | epoch | final PCKh | best PCKh | minutes in all | img/s | data | validation |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        hit = "not reached" if r["minutes_to_90"] is None else f"{r['minutes_to_90']:.1f}"
        lines.append(f"| {r['seed']} | {hit} | {r['epoch_at_90'] or '-'} | {r['final_pckh']:.1f}% | "
                     f"{r['best_pckh']:.1f}% | {r['minutes_total']:.1f} (process {r['process_wall_minutes']:.1f}) | "
                     f"{r['median_images_per_s']:.1f} | {r['data_share']:.0%} | {r['val_share']:.0%} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "time_to_accuracy.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "time_to_accuracy.md"), "w") as f:
        f.write(text + "\n")
    return 0 if all(r["minutes_to_90"] is not None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
