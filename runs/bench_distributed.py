"""Benchmark of the RealMix step with several replicas: the global-equivalent step
(--replica_mode=global: cross-replica BatchNorm statistics, MixUp rows gathered over replicas,
global OOD percentile and loss counts) against the per-replica step (the released behaviour),
both on R logical CPU devices with the same global batch, plus one device for reference.

    python -m runs.bench_distributed --devices=2 --batch=64 --filters=32 --repeat=4

The CPU is split into --devices logical devices at start-up (on a GPU host, pass --devices=0
to use the visible GPUs). The steps alternate round by round, so that other jobs slow them
alike; s/step is the median over the rounds (warm-up steps excluded). The goal (issue 10): the
global-equivalent step costs at most 1.15x the per-replica step.
"""
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("devices", 2, "Logical CPU devices (0: the visible GPUs).")
flags.DEFINE_integer("batch", 64, "Global labeled batch (the unlabeled one is 2 views of it).")
flags.DEFINE_integer("filters", 32, "WRN width (32 = WRN-28-2).")
flags.DEFINE_integer("repeat", 4, "Residual blocks per stage.")
flags.DEFINE_integer("size", 32, "Image size.")
flags.DEFINE_integer("steps", 3, "Timed steps per round.")
flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
flags.DEFINE_integer("rounds", 5, "Rounds alternating the variants.")
flags.DEFINE_float("gamma", 0.6, "OOD-mask percentile (exercises the gathered percentile).")
flags.DEFINE_string("tsa", "linear", "TSA schedule.")
flags.DEFINE_string("precision", "float32", "float32 or mixed_bfloat16.")


def main(argv):
    del argv
    from libml import distribute
    distribute.configure_devices(FLAGS.devices)
    import numpy as np
    import tensorflow as tf
    from realmix_tf.realmix import RealMix

    rng = np.random.RandomState(0)
    b, s = FLAGS.batch, FLAGS.size
    x = rng.uniform(-1, 1, (b, s, s, 3)).astype("f4")
    y = rng.randint(0, 10, b).astype("i8")
    u = rng.uniform(-1, 1, (b, 2, s, s, 3)).astype("f4")
    kwargs = dict(filters=FLAGS.filters, repeat=FLAGS.repeat, warmup_kimg=1, gamma=FLAGS.gamma,
                  tsa=FLAGS.tsa, train_kimg=64, precision=FLAGS.precision)
    devices = [f"/cpu:{i}" for i in range(FLAGS.devices)] if FLAGS.devices else None
    strategy = tf.distribute.MirroredStrategy(devices)
    replicas = strategy.num_replicas_in_sync
    batch = ({"image": x, "label": y}, {"image": u})
    parts = distribute.split_batch(strategy, tf.nest.map_structure(tf.constant, batch))

    steps = {}
    for mode in ("global", "per_replica"):
        with strategy.scope():
            model = RealMix(10, (s, s, 3), replica_mode=mode, **kwargs)
        steps[f"{replicas} replicas, {mode}"] = tf.function(
            lambda d, m=model: strategy.run(m.train_step, args=(d,)))
    one = RealMix(10, (s, s, 3), **kwargs)
    whole = tf.nest.map_structure(tf.constant, batch)
    steps["1 device"] = lambda d, m=one, step=tf.function(one.train_step): step(whole)

    def timed(fn, count):
        start = time.perf_counter()
        for _ in range(count):
            out = fn(parts)
        tf.nest.map_structure(lambda t: t.values[0].numpy() if hasattr(t, "values")
                              else t.numpy(), out)
        return (time.perf_counter() - start) / count

    for fn in steps.values():
        timed(fn, FLAGS.warmup)
    times = {name: [] for name in steps}
    for _ in range(FLAGS.rounds):
        for name, fn in steps.items():
            times[name].append(timed(fn, FLAGS.steps))
    print(f"RealMix step, global batch {b} (+{2 * b} unlabeled), WRN filters={FLAGS.filters} "
          f"repeat={FLAGS.repeat}, {FLAGS.size}px, {FLAGS.precision}, gamma={FLAGS.gamma}, "
          f"tsa={FLAGS.tsa}; median of {FLAGS.rounds} rounds x {FLAGS.steps} steps")
    median = {name: float(np.median(t)) for name, t in times.items()}
    for name, value in median.items():
        print(f"  {name:28s} {value * 1000:8.1f} ms/step  {b / value:7.1f} img/s")
    g, p = median[f"{replicas} replicas, global"], median[f"{replicas} replicas, per_replica"]
    ratios = [a / c for a, c in zip(times[f"{replicas} replicas, global"],
                                    times[f"{replicas} replicas, per_replica"])]
    print(f"  global / per_replica: {g / p:.3f} (per round: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); goal <= 1.15")
    return 0


if __name__ == "__main__":
    app.run(main)
