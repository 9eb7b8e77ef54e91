"""Times the PyTorch reading of the reference (`torch_reference.py`) on the benchmark's workload.

    python -m experiments.parity.benchmark_torch_reference --batch-size 4 --modalities 2 --image-size 256 --mode infer

Needs torch (not a dependency of the package; e.g. `pip install torch==2.13.0` in another
environment).  It runs the reference's computation as the release does it (three
convolutions per expert branch, per-pair routing), but without the release's discarded
layer4, so the release itself is somewhat slower than this.  Peak memory is the process's
peak resident set size, over its life and while stepping (warm-up step included).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from experiments.bench import resident_memory
from experiments.parity import torch_reference as tr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--modalities", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", help="write the result object here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = tr.UniMMAD(args.image_size)
    size, batch = args.image_size, args.batch_size
    specific = torch.zeros(batch, tr.M_SLOTS, 3, size, size)
    specific[:, : args.modalities] = torch.randn(batch, args.modalities, 3, size, size)
    share = torch.cat([specific[:, m] for m in range(tr.M_SLOTS)], dim=1)
    counts = [args.modalities] * batch
    weights = torch.ones(batch)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        if args.mode == "infer":
            model.eval()
            with torch.no_grad():
                model.anomaly_maps(model(share, specific, counts), batch)
        else:
            model.train()
            optimizer.zero_grad()
            total, _, _ = model.losses(model(share, specific, counts), weights, epoch=0)
            total.backward()
            optimizer.step()

    resident_memory.reset_peak()
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - start
    result = {
        "mode": args.mode,
        "batch_size": batch,
        "modalities": args.modalities,
        "image_size": size,
        "device": f"cpu, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "images_per_s": args.steps * batch / elapsed,
        "seconds_per_step": elapsed / args.steps,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "stepping_peak_rss_bytes": resident_memory.peak_bytes(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
