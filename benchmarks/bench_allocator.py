"""Would keeping large buffers on glibc's heap speed up the network's passes?

glibc's malloc gives allocations above its mmap threshold (which it raises by itself to
at most 32 MiB) fresh pages from the kernel and returns them on free, so the activations
of a 3D network, allocated again on every pass, are zero-filled by the kernel again on
every pass. glibc's own variables raise the threshold for a process:
``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=536870912`` (256 and 512 MiB).

This benchmark times the group level's passes on an existing run (its network and its
preprocessed maps, nothing is written), each setting in a fresh process, in turn:

- ``occlusion``: one forward pass over the test subjects as the occlusion test makes
  (batch 16, the group level's precision), the median of ``--passes``;
- ``backprojection``: the back-projection of the run's RoIs over 16 training subjects;
- ``training``: a training step (batch 8, forward, backward, SGD), the median of 10.

against the baseline, glibc's defaults, with each process's peak RSS::

    python benchmarks/bench_allocator.py --output DEMO/results [--rounds 2]

The selection's memory with the same variables: run ``benchmarks/bench_memory.py`` with
and without them in its environment. (Measured results: docs/benchmarks.md. The passes
are faster in a fresh process, but in the group level, whose process has already raised
glibc's threshold by the time of the explanations, the gain is small, and the
selection's peak memory grows by 1-7 %; so the app leaves glibc as it is.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Each setting's environment for glibc's malloc (read when the process starts).
SETTINGS = {
    "glibc defaults (baseline)": {},
    "heap up to 256 MiB": {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(512 << 20)},
}


def worker(args) -> None:
    import torch
    from bench_backprojection import _tensor_parts
    from bench_explanations import _inputs, run_rois

    from brainage_xai.explain import backprojection
    from brainage_xai.explain.occlusion import torch_predictor
    from brainage_xai.model.training import resolve_device, resolve_precision

    out = Path(args.output)
    group = out / "group"
    resolution = float(json.loads((group / "analysis.json").read_text())["resolution"])
    dev, model, _, x, which, _ = _inputs(out, group, resolution, args.device)
    dtype = resolve_precision("auto", resolve_device(args.device))
    times = {}

    test = np.ascontiguousarray(x[which == "test"])
    predict = torch_predictor(model, batch_size=16, device=dev, dtype=dtype)
    predict(test[:16])  # warm-up
    t = []
    for _ in range(args.passes):
        t0 = time.perf_counter()
        predict(test)
        t.append(time.perf_counter() - t0)
    times["occlusion"] = float(np.median(t))

    metrics = json.loads((group / "metrics.json").read_text())
    tensor = (metrics.get("decomposition") or {}).get("tensor", "activations")
    if tensor in ("deviations", "relevance"):
        layer = run_rois(group)[2].get("Layer")
        dec = dict(np.load(group / "decomposition.npz"))
        X = torch.from_numpy(np.ascontiguousarray(x[which == "train"][:16, None])).float()
        parts = _tensor_parts(model, X, layer, tensor)
        t0 = time.perf_counter()
        backprojection.back_project(model, X, layer, dec["U2"], dec["D"], dec["U3"], tensor=tensor,
                                    **parts, device=dev, dtype=dtype)
        times["backprojection"] = time.perf_counter() - t0

    train = torch.from_numpy(np.ascontiguousarray(x[which == "train"][:, None]))
    model.train().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    t = []
    for step in range(12):
        xb = train[(step * 8) % (len(train) - 8):][:8].to(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(xb).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t.append(time.perf_counter() - t0)
    times["training"] = float(np.median(t[2:]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"setting": args.worker, "peak_rss_gib": round(peak, 2), **times}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="output directory of a group run")
    parser.add_argument("--rounds", type=int, default=1, help="processes per setting, in turn")
    parser.add_argument("--passes", type=int, default=5, help="occlusion passes per process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    rows = []
    # the user's own malloc variables would make both settings the same
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    for _ in range(args.rounds):
        for setting, variables in SETTINGS.items():
            cmd = [sys.executable, __file__, "--output", args.output, "--passes", str(args.passes),
                   "--device", args.device, "--worker", setting]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**env, **variables})
            if done.returncode:
                sys.exit(f"{setting} failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    med = pd.DataFrame(rows).groupby("setting", sort=False).median()
    base = med.loc[next(iter(SETTINGS))]
    for col in [c for c in med.columns if c != "peak_rss_gib"]:
        med[f"{col} speed-up"] = (base[col] / med[col]).round(2)
    print(f"{args.output}: seconds (medians over {args.rounds} process(es) per setting), peak RSS")
    print(med.round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
