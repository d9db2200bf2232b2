#!/usr/bin/env python3
"""A dependency-free stand-in for a training script that succeeds.

It prints the trainmesh identifiers it was started with, then "trains" for --steps steps,
appending one JSON line of metrics per step to $TRAINMESH_METRICS_FILE (when set) and
printing a progress line to stdout. Exits 0.

    python3 examples/train_ok.py --steps 20 --sleep 0.05
"""

import argparse
import json
import math
import os
import random
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="number of steps (default 20)")
    p.add_argument(
        "--sleep", type=float, default=0.05, help="seconds to sleep per step (default 0.05)"
    )
    args = p.parse_args(argv)
    if args.steps < 0:
        p.error("--steps must be >= 0")
    if args.sleep < 0:
        p.error("--sleep must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
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
    metrics = open(metrics_path, "a", encoding="utf-8") if metrics_path else None
    print(
        "training for {} steps, metrics -> {}".format(args.steps, metrics_path or "(none)"),
        flush=True,
    )

    rng = random.Random(42)  # deterministic, so runs are comparable
    base_lr = 1e-3
    try:
        for step in range(1, args.steps + 1):
            # Strictly decreasing loss with a little noise that never reverses the trend.
            loss = 2.3 * math.exp(-step / 8.0) + 0.1 + 0.01 * rng.random() / step
            lr = base_lr * (0.5 * (1 + math.cos(math.pi * (step - 1) / max(args.steps, 1))))
            reward_mean = 1.0 - loss / 2.4
            record = {
                "step": step,
                "loss": round(loss, 6),
                "learning_rate": round(lr, 9),
                "reward": {"mean": round(reward_mean, 6), "std": round(0.02 + 0.01 / step, 6)},
            }
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            print(
                "step {}/{} loss={:.4f} lr={:.2e}".format(step, args.steps, loss, lr),
                flush=True,
            )
            if args.sleep:
                time.sleep(args.sleep)
    finally:
        if metrics is not None:
            metrics.close()
    print("training finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
