"""Benchmark of the brain-age network: accuracy on the simulated cohort and throughput.

1. Throughput: training steps (forward, backward, SGD) per second of the paper's network
   on real preprocessed maps, for each precision / memory layout, against the baseline
   "fp32, contiguous" (PyTorch's defaults), measured in the same run. On CUDA the same
   with and without mixed precision.
2. Accuracy: the group level (split, training, predictions) on the default simulated
   cohort; the test MAE against the MAE of predicting the training mean (goal: ratio at
   most 0.3), with the wall time and the per-epoch throughput of the real training.

Usage::

    python benchmarks/bench_training.py [--subjects 200] [--resolution 4] [--epochs N]
        [--dir DIR] [--skip-accuracy] [--skip-throughput] [--n-cpus N]

The cohort and its participant-level outputs are cached in ``--dir`` (default:
``brainage-bench`` in the system's temporary folder); the group outputs
are rewritten on every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def prepare(args) -> tuple[Path, Path]:
    from brainage_xai.cli.run import main
    from brainage_xai.simulate import simulate_cohort

    bids = args.dir / f"sim-n{args.subjects}-res{args.resolution}"
    out = args.dir / f"out-n{args.subjects}-res{args.resolution}"
    tic = time.perf_counter()
    simulate_cohort(bids, n_subjects=args.subjects, resolution=args.resolution, seed=0, quiet=True, n_jobs=2)
    code = main([str(bids), str(out), "participant", "--resolution", str(args.resolution),
                 "--skip-bids-validation", "--quiet"])  # fmt: skip
    if code:
        sys.exit(f"participant level failed with exit code {code}")
    print(f"cohort and participant level ready in {time.perf_counter() - tic:.0f} s ({bids})")
    return bids, out


def throughput(out: Path, args) -> None:
    from brainage_xai.bids.derivatives import collect_preprocessed
    from brainage_xai.model.data import input_normalisation, load_maps, standardise_inputs
    from brainage_xai.model.network import PreActResNet3d

    paths = [p for _, p in collect_preprocessed(out, "volume", resolution=args.resolution)][:32]
    maps, _ = load_maps(paths)
    x = standardise_inputs(maps, input_normalisation(maps))
    y = torch.randn(len(x), 1)
    configs = [
        ("fp32, contiguous (baseline: PyTorch default)", "cpu", None, torch.contiguous_format),
        ("fp32, channels_last_3d", "cpu", None, torch.channels_last_3d),
        ("bf16 autocast, contiguous", "cpu", torch.bfloat16, torch.contiguous_format),
        ("bf16 autocast, channels_last_3d", "cpu", torch.bfloat16, torch.channels_last_3d),
    ]
    if torch.cuda.is_available():
        configs += [
            ("CUDA fp32 (baseline on GPU)", "cuda", None, torch.channels_last_3d),
            ("CUDA fp16 AMP", "cuda", torch.float16, torch.channels_last_3d),
            ("CUDA bf16 AMP", "cuda", torch.bfloat16, torch.channels_last_3d),
        ]
    batch = 8
    print(f"\nthroughput: paper network {PreActResNet3d().widths}/{PreActResNet3d().depths}, "
          f"grid {tuple(x.shape[2:])}, batch {batch}, {torch.get_num_threads()} CPU threads")  # fmt: skip
    print(f"{'configuration':48s} {'subjects/s':>11s} {'speed-up':>9s}")
    base = {}
    for name, device, dtype, fmt in configs:
        rate = _rate(x, y, device, dtype, fmt, batch, args.seconds)
        base.setdefault(device, rate)
        print(f"{name:48s} {rate:11.2f} {rate / base[device]:8.2f}x")


def _rate(x, y, device, dtype, fmt, batch, seconds) -> float:
    """Training subjects per second of the paper network with one configuration."""
    from brainage_xai.model.network import PreActResNet3d

    torch.manual_seed(0)
    model = PreActResNet3d().to(device).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=dtype is torch.float16)

    def step(i):
        xb = x[(i * batch) % len(x) :][:batch].to(device).contiguous(memory_format=fmt)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(xb)
        loss = torch.nn.functional.mse_loss(out.float(), y[: len(xb)].to(device))
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return len(xb)

    step(0)  # warm-up (kernel selection)
    if device == "cuda":
        torch.cuda.synchronize()
    tic, steps, seen = time.perf_counter(), 0, 0
    while steps < 2 or time.perf_counter() - tic < seconds:
        seen += step(steps)
        steps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - tic)


def accuracy(bids: Path, out: Path, args) -> None:
    from brainage_xai.cli.parser import parse_args
    from brainage_xai.cli.run import run

    shutil.rmtree(out / "group", ignore_errors=True)
    shutil.rmtree(out / ".work" / "group", ignore_errors=True)
    argv = [str(bids), str(out), "group", "--resolution", str(args.resolution), "--skip-bids-validation"]
    if args.epochs:
        argv += ["--epochs", str(args.epochs)]
    if args.n_cpus:
        argv += ["--n-cpus", str(args.n_cpus)]
    config = parse_args(argv)
    tic = time.perf_counter()
    code = run(config)
    wall = time.perf_counter() - tic
    if code:
        sys.exit(f"group level failed with exit code {code}")
    metrics = json.loads((out / "group" / "metrics.json").read_text())["metrics"]["age"]
    model = json.loads((out / "group" / "model.json").read_text())
    history = model["training"]["history"]
    rates = [h["subjects_per_second"] for h in history]
    print(f"\naccuracy: {args.subjects} simulated subjects, {args.resolution} mm, "
          f"precision {model['training']['precision']}, {len(history)} epochs run "
          f"(best {model['training']['best_epoch']}), group level part 1 wall time {wall / 60:.1f} min")  # fmt: skip
    print(f"training throughput per epoch: median {np.median(rates):.2f} subjects/s "
          f"(min {min(rates):.2f}, max {max(rates):.2f})")  # fmt: skip
    print(f"{'split':6s} {'n':>4s} {'MAE':>7s} {'mean-age MAE (baseline)':>24s} {'ratio':>6s} {'r':>6s}")
    for split in ("train", "val", "test"):
        m = metrics[split]
        print(f"{split:6s} {m['n']:4d} {m['mae']:7.2f} {m['mean_predictor_mae']:24.2f} "
              f"{m['mae'] / m['mean_predictor_mae']:6.3f} {m['r']:6.3f}")  # fmt: skip
    ratio = metrics["test"]["mae"] / metrics["test"]["mean_predictor_mae"]
    print(f"goal test MAE <= 0.3 x mean-age MAE: {'met' if ratio <= 0.3 else 'NOT met'} (ratio {ratio:.3f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=None, help="default: the group level's")
    parser.add_argument("--n-cpus", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing per throughput configuration")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "brainage-bench")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    if args.n_cpus:
        torch.set_num_threads(args.n_cpus)
    bids, out = prepare(args)
    if not args.skip_throughput:
        throughput(out, args)
    if not args.skip_accuracy:
        accuracy(bids, out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
