#!/usr/bin/python3
"""The PyTorch side of bench/train_step: one training step of the default model.

    /usr/bin/python3 bench/torch_train_step.py [--threads N] [--steps N] [--warmup N]

The model is tests/reference/moe_reference.py's, run in float32 with the
default shapes (micro batch 2, 4 slots, T 256: 2048 tokens per step), the
routed experts as one gather / SwiGLU / index_add per expert, and gradients
accumulated over the slots by autograd. Two optimizers are timed:
  adamw       torch.optim.AdamW over every parameter
  muon+adamw  Muon (nesterov momentum, 5 Newton-Schulz iterations, 0.2 sqrt(max
              dim) scale) on the hidden matrices, torch.optim.AdamW on the rest
Each prints one JSON line with median milliseconds (step, forward, backward,
optimizer) and tokens/s; bench/train_step reads them. Exits with status 2 and a
plain-text line when torch or numpy cannot be imported.
"""

import argparse
import os
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    try:
        import numpy  # noqa: F401  (needed by moe_reference)
        import torch
    except ImportError as e:
        print(f"torch unavailable: {e}")
        return 2
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "tests", "reference"))
    import json
    import moe_reference

    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    for muon in (False, True):
        result = moe_reference.bench_step(threads, args.steps, args.warmup, muon)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
