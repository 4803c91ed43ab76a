"""Benchmark of the RealMix step with several replicas: the global-equivalent step
(--replica_mode=global: cross-replica BatchNorm statistics, MixUp rows gathered over replicas,
global OOD percentile and loss counts) against the per-replica step (the released behaviour),
both on R logical CPU devices with the same global batch, plus one device for reference.

    python -m runs.bench_distributed --devices=2 --batch=64 --filters=32 --repeat=4 --rounds=20

Each variant runs in its own process (as runs/bench_step.py runs its peer), built and warmed
up once; the parent asks them in turn, round by round (the order rotating every round), to time
--steps steps, so that other jobs on a shared machine slow them alike and no variant shares a
process's thread pools with another. The CPU is split into --devices logical devices in the
processes of the multi-replica variants (on a GPU host, pass --devices=0 to use the visible
GPUs). Reported: s/step of each variant (median over the rounds), the per-round ratio
global / per_replica (median, min-max, interquartile range, standard deviation) and how many
rounds a 95 % confidence interval of +-`--resolution` on the mean ratio needs; the goal
(issue 10) is a ratio of at most 1.15, which is "resolved" when the interval lies on one side.
"""
import json
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from libml.base import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("devices", 2, "Logical CPU devices (0: the visible GPUs).")
flags.DEFINE_integer("batch", 64, "Global labeled batch (the unlabeled one is 2 views of it).")
flags.DEFINE_integer("filters", 32, "WRN width (32 = WRN-28-2).")
flags.DEFINE_integer("repeat", 4, "Residual blocks per stage.")
flags.DEFINE_integer("size", 32, "Image size.")
flags.DEFINE_integer("steps", 3, "Timed steps per round.")
flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
flags.DEFINE_integer("rounds", 10, "Rounds; each times every variant once.")
flags.DEFINE_float("resolution", 0.05, "Half-width of the 95 % interval of the mean ratio "
                   "global / per_replica that the rounds-needed figure aims at.")
flags.DEFINE_float("goal", 1.15, "The ratio global / per_replica to resolve against.")
flags.DEFINE_float("gamma", 0.6, "OOD-mask percentile (exercises the gathered percentile).")
flags.DEFINE_string("tsa", "linear", "TSA schedule.")
flags.DEFINE_string("precision", "float32", "float32 or mixed_bfloat16.")
flags.DEFINE_string("worker", "", "Internal: run one variant (global, per_replica, one) and "
                    "answer `time N` lines on stdin.")

VARIANTS = ("global", "per_replica", "one")
Z95 = 1.96


# ---------------------------------------------------------------------------------------------
# Statistics of the rounds (pure)

def ratio_summary(ratios, resolution: float, goal: float) -> dict:
    """Per-round ratios -> median, min, max, IQR, sd, the rounds a 95 % interval of
    +-resolution needs, the interval of the mean, and whether it lies on one side of `goal`."""
    values = sorted(float(r) for r in ratios)
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")

    def quantile(q):
        pos = q * (n - 1)
        low, high = int(math.floor(pos)), int(math.ceil(pos))
        return values[low] + (values[high] - values[low]) * (pos - low)

    half = Z95 * sd / math.sqrt(n) if n > 1 else float("inf")
    needed = math.ceil((Z95 * sd / resolution) ** 2) if n > 1 else None
    return dict(n=n, median=quantile(0.5), min=values[0], max=values[-1],
                iqr=quantile(0.75) - quantile(0.25), sd=sd, mean=mean, low=mean - half,
                high=mean + half, rounds_needed=needed,
                resolved=(mean + half < goal) or (mean - half > goal))


def describe(summary: dict, resolution: float, goal: float) -> str:
    s = summary
    verdict = (f"{'below' if s['high'] < goal else 'above'} {goal:g} with 95 % confidence"
               if s["resolved"] else f"not resolved against {goal:g}")
    return (f"global / per_replica per round: median {s['median']:.3f}, range {s['min']:.2f}-"
            f"{s['max']:.2f}, IQR {s['iqr']:.3f}, sd {s['sd']:.3f} over {s['n']} rounds; mean "
            f"{s['mean']:.3f}, 95 % interval {s['low']:.3f}-{s['high']:.3f}: {verdict}; "
            f"rounds needed for +-{resolution:g}: {s['rounds_needed']}")


# ---------------------------------------------------------------------------------------------
# A variant's process

def serve(variant: str) -> int:
    from libml.train import devices as distribute
    distribute.configure_devices(FLAGS.devices if variant != "one" else 0)
    import numpy as np
    import tensorflow as tf
    from realmix_tf.realmix import RealMix

    rng = np.random.RandomState(0)
    b, s = FLAGS.batch, FLAGS.size
    batch = ({"image": rng.uniform(-1, 1, (b, s, s, 3)).astype("f4"),
              "label": rng.randint(0, 10, b).astype("i8")},
             {"image": rng.uniform(-1, 1, (b, 2, s, s, 3)).astype("f4")})
    batch = tf.nest.map_structure(tf.constant, batch)
    kwargs = dict(filters=FLAGS.filters, repeat=FLAGS.repeat, warmup_kimg=1, gamma=FLAGS.gamma,
                  tsa=FLAGS.tsa, train_kimg=64, precision=FLAGS.precision)
    if variant == "one":
        model = RealMix(10, (s, s, 3), **kwargs)
        step, data, replicas = tf.function(model.train_step), batch, 1
    else:
        devices = [f"/cpu:{i}" for i in range(FLAGS.devices)] if FLAGS.devices else None
        strategy = tf.distribute.MirroredStrategy(devices)
        with strategy.scope():
            model = RealMix(10, (s, s, 3), replica_mode=variant, **kwargs)
        step = tf.function(lambda d: strategy.run(model.train_step, args=(d,)))
        data, replicas = distribute.split_batch(strategy, batch), strategy.num_replicas_in_sync

    def timed(count):
        start = time.perf_counter()
        for _ in range(count):
            out = step(data)
        tf.nest.map_structure(lambda t: t.values[0].numpy() if hasattr(t, "values")
                              else t.numpy(), out)
        return (time.perf_counter() - start) / max(count, 1)

    timed(FLAGS.warmup)
    print(json.dumps({"ready": variant, "replicas": replicas}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        print(json.dumps({"seconds": timed(int(words[1]))}), flush=True)
    return 0


class Variant:
    """A variant's process: `time(steps)` -> seconds per step."""

    def __init__(self, variant: str, argv):
        args = [a for a in argv[1:] if not a.startswith("--worker")]
        self.proc = subprocess.Popen([sys.executable, "-m", "runs.bench_distributed",
                                      f"--worker={variant}", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a benchmark process exited (code {self.proc.wait()})")
        return json.loads(line)

    def time(self, steps: int) -> float:
        self.proc.stdin.write(f"time {steps}\n")
        self.proc.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def main(argv):
    if FLAGS.worker:
        return serve(FLAGS.worker)
    import numpy as np
    variants = {}
    try:
        for name in VARIANTS:          # built one after the other: start-up does not overlap
            variants[name] = Variant(name, sys.argv)
        times = {name: [] for name in variants}
        for r in range(FLAGS.rounds):
            order = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
            for name in order:
                times[name].append(variants[name].time(FLAGS.steps))
    finally:
        for v in variants.values():
            v.close()
    replicas = variants["global"].info["replicas"]
    labels = {"global": f"{replicas} replicas, global", "per_replica": f"{replicas} replicas, "
              f"per_replica", "one": "1 device"}
    b = FLAGS.batch
    print(f"RealMix step, global batch {b} (+{2 * b} unlabeled), WRN filters={FLAGS.filters} "
          f"repeat={FLAGS.repeat}, {FLAGS.size}px, {FLAGS.precision}, gamma={FLAGS.gamma}, "
          f"tsa={FLAGS.tsa}; one process per variant, median of {FLAGS.rounds} rounds x "
          f"{FLAGS.steps} steps; load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, values in times.items():
        value = float(np.median(values))
        print(f"  {labels[name]:28s} {value * 1000:8.1f} ms/step  {b / value:7.1f} img/s  "
              f"(rounds {min(values) * 1000:.1f}-{max(values) * 1000:.1f})")
    ratios = [g / p for g, p in zip(times["global"], times["per_replica"])]
    print("  " + describe(ratio_summary(ratios, FLAGS.resolution, FLAGS.goal), FLAGS.resolution,
                          FLAGS.goal))
    print(f"  per round: {', '.join(f'{r:.2f}' for r in ratios)}")
    return 0


if __name__ == "__main__":
    cli.run(main)
