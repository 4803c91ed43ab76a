"""Benchmark of the training views (libml.data.augment.VIEWS): images per second of each view on
random uint8 batches inside tf.data (graph mode, one map call per batch, seed per batch).

    python -m runs.bench_views                                  # weak, strong; 64x32x32x3
    python -m runs.bench_views --views=strong --steps=100 --shape=64,28,28,1

Reports wall images/s and process CPU microseconds per image (user + system), which is less
sensitive to the other processes on a shared machine.
"""
import os
import time

from absl import flags

from libml.base import cli

FLAGS = flags.FLAGS
flags.DEFINE_list("views", ["weak", "strong"], "Views to measure (keys of libml.data.augment.VIEWS).")
flags.DEFINE_list("shape", ["64", "32", "32", "3"], "Batch shape N,H,W,C.")
flags.DEFINE_integer("steps", 100, "Measured batches per view.")
flags.DEFINE_integer("warmup", 10, "Batches run before timing (the first one traces).")


def measure(name: str, shape, steps: int, warmup: int):
    import numpy as np
    import tensorflow as tf
    from libml.data import augment
    images = np.random.RandomState(0).randint(0, 256, size=shape).astype(np.uint8)
    options = tf.data.Options()
    options.autotune.enabled = False
    ds = (tf.data.Dataset.from_tensors(images).repeat().enumerate()
          .map(lambda step, x: augment.view(name, x, tf.stack([step, tf.constant(0, tf.int64)])))
          .with_options(options))
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    wall, cpu = time.perf_counter(), sum(os.times()[:2])
    for _ in range(steps):
        out = next(it)
    _ = out.numpy()
    wall, cpu = time.perf_counter() - wall, sum(os.times()[:2]) - cpu
    count = steps * shape[0]
    return count / wall, 1e6 * cpu / count


def main(argv):
    shape = [int(v) for v in FLAGS.shape]
    print(f"{'view':8s} {'shape':>14s} {'images/s':>10s} {'CPU us/img':>11s}")
    for name in FLAGS.views:
        rate, cpu = measure(name, shape, FLAGS.steps, FLAGS.warmup)
        print(f"{name:8s} {'x'.join(map(str, shape)):>14s} {rate:10.0f} {cpu:11.1f}", flush=True)


if __name__ == "__main__":
    cli.run(main)
