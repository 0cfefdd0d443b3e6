"""Benchmark: the network's passes with its weights in the inputs' memory format, or not.

Every pass of a trained network outside training (predictions, activations, GradCAM, the
occlusion test, the back-projection) converts its inputs to the memory format that
:func:`brainage_xai.model.training.memory_format` names for the device and precision
(channels-last for float32). A network loaded from its safetensors file (``--model``,
the participant level's activations, every benchmark) is contiguous, so
:func:`brainage_xai.model.training.place` puts the weights in that format too. This
times both, weights left contiguous (the baseline) and weights placed, on one network,
in one process, alternating:

- ``forward``: a prediction pass (``torch.inference_mode``), inputs in the format;
- ``forward + backward``: a pass with the input's gradient (GradCAM, the back-projection),
  the inputs as they come (the baseline) and in the format.

Run::

    python benchmarks/bench_layout.py [--model RUN/group/model.safetensors] [--batch 16]

Without ``--model`` a freshly initialised paper network at 4 mm is used (the weights do
not change the time). Prints a table of medians and the speed-up over the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model.safetensors (default: a fresh paper network at 4 mm)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from brainage_xai.model.io import load_model
    from brainage_xai.model.network import PreActResNet3d
    from brainage_xai.model.training import memory_format, place, resolve_precision

    device = torch.device(args.device)
    if args.model:
        model, meta = load_model(args.model, device="cpu")
        grid = tuple(meta["input_grid"]["shape"])
    else:
        model, grid = PreActResNet3d(), (50, 59, 48)
    model.eval()
    dtype = resolve_precision("auto", device)
    fmt = memory_format(device, None)  # the float32 passes: GradCAM, activations
    x = torch.randn(args.batch, 1, *grid)
    print(f"device {device}, float32 passes (the group's precision here: {dtype or 'float32'}), "
          f"batch {args.batch} at {grid}, {torch.get_num_threads()} threads, format {fmt}")

    def forward():
        with torch.inference_mode():
            model(x.to(device).contiguous(memory_format=fmt))

    def backward(inputs_fmt):
        def run():
            xb = x.to(device).contiguous(memory_format=inputs_fmt).requires_grad_(True)
            model(xb).sum().backward()
            model.zero_grad(set_to_none=True)
        return run

    rows = []
    cases = [
        ("forward", "weights as loaded (baseline)", lambda: model.to(device).to(memory_format=torch.contiguous_format), forward),
        ("forward", "place() (weights in the format)", lambda: place(model, device), forward),
        ("forward + backward", "weights and inputs as they come (baseline)",
         lambda: model.to(device).to(memory_format=torch.contiguous_format), backward(torch.contiguous_format)),
        ("forward + backward", "place(), inputs in the format", lambda: place(model, device), backward(fmt)),
    ]
    times = {i: [] for i in range(len(cases))}
    for _ in range(2):  # alternate, so that a load change on a shared machine hits both
        for i, (_, _, setup, fn) in enumerate(cases):
            setup()
            times[i] += _time(fn, args.repeats)
    for i, (kind, how, _, _) in enumerate(cases):
        med = statistics.median(times[i])
        base = statistics.median(times[i - i % 2])
        rows.append((kind, how, med, base / med))
    print(f"{'pass':<20} {'weights':<45} {'median s':>9} {'speed-up':>9}")
    for kind, how, med, ratio in rows:
        print(f"{kind:<20} {how:<45} {med:9.3f} {ratio:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
