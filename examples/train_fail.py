#!/usr/bin/env python3
"""A dependency-free stand-in for a training script that fails like a real one.

It writes a few metric lines to $TRAINMESH_METRICS_FILE (when set), prints some log
lines, then dies with a CUDA out-of-memory RuntimeError raised a few calls deep, so
Python prints a genuine traceback to stderr and exits 1.

    python3 examples/train_fail.py
"""

import argparse
import json
import os
import sys
import time

OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 2.00 GiB "
    "(GPU 0; 79.35 GiB total capacity)"
)


def allocate_activations(batch_size, seq_len):
    # Where a real framework would call into the CUDA allocator.
    raise RuntimeError(OOM_MESSAGE)


def forward(batch_size, seq_len):
    return allocate_activations(batch_size, seq_len)


def train_step(step, batch_size, seq_len):
    return forward(batch_size, seq_len)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="steps that succeed before the OOM")
    p.add_argument("--sleep", type=float, default=0.05, help="seconds per step")
    args = p.parse_args(argv)

    env = os.environ
    print(
        "trainmesh job_id={} attempt={} correlation_id={}".format(
            env.get("TRAINMESH_JOB_ID", ""),
            env.get("TRAINMESH_ATTEMPT", ""),
            env.get("TRAINMESH_CORRELATION_ID", ""),
        ),
        flush=True,
    )
    metrics_path = env.get("TRAINMESH_METRICS_FILE")
    print("loading model and dataset", flush=True)
    with open(metrics_path or os.devnull, "a", encoding="utf-8") as metrics:
        for step in range(1, args.steps + 1):
            loss = round(2.3 - 0.1 * step, 4)
            metrics.write(json.dumps({"step": step, "loss": loss, "learning_rate": 0.001}) + "\n")
            metrics.flush()
            print("step {} loss={:.4f}".format(step, loss), flush=True)
            time.sleep(max(args.sleep, 0))
    print("increasing sequence length to 8192", flush=True)
    train_step(args.steps + 1, batch_size=64, seq_len=8192)  # raises
    return 0


if __name__ == "__main__":
    sys.exit(main())
