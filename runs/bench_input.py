"""Benchmark of the SSL input pipeline: images per second delivered to the training step.

One step = one labeled batch (B augmented images) + one unlabeled batch (B images x 2 views),
decoded, augmented and scaled to [-1, 1]; the figure counts 3B images per step.

    python -m runs.bench_input                       # 50,000 CIFAR-sized images, B=64
    python -m runs.bench_input --modes=cached --steps=500

The synthetic dataset (smooth random images + noise, PNG, like CIFAR in size and PNG
compressibility) is written once under --data_dir and reused.
"""
import os
import time

import numpy as np
from absl import flags

from libml.errors import absl_run

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "/tmp/realmix_bench_input", "Where the synthetic dataset is written once.")
flags.DEFINE_integer("count", 50_000, "Images in the synthetic training set.")
flags.DEFINE_integer("nlabeled", 4000, "Labeled images (the rest is unlabeled).")
flags.DEFINE_integer("batch", 64, "Batch size B (labeled B, unlabeled B x 2 views).")
flags.DEFINE_integer("steps", 300, "Measured steps per mode.")
flags.DEFINE_integer("warmup", 30, "Steps run before timing.")
flags.DEFINE_list("modes", ["cached", "streamed", "sharded"],
                  "cached: decoded in memory; streamed: parse+decode from the record files; "
                  "sharded: unlabeled stream from 8 shard files (the Extend path).")
flags.DEFINE_integer("parallel", 0, "num_parallel_calls (0: autotune).")


def synthetic_images(count: int, seed: int = 0) -> np.ndarray:
    """Smooth random 32x32x3 images with mild noise: PNG sizes close to CIFAR's (~2.3 KB)."""
    rng = np.random.RandomState(seed)
    coarse = rng.randint(0, 256, size=[count, 4, 4, 3]).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    smooth = (smooth + np.roll(smooth, 4, axis=1) + np.roll(smooth, 4, axis=2)) / 3
    noise = rng.normal(0, 12, size=smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def prepare(root: str, count: int, nlabeled: int) -> str:
    from tests.fixtures_data import write_set
    name = f"bench.1@{nlabeled}-1"
    split = os.path.join(root, "SSL", f"bench.1@{nlabeled}")
    if os.path.exists(split + "-unlabel.tfrecord"):
        return name
    os.makedirs(os.path.join(root, "SSL"), exist_ok=True)
    images = synthetic_images(count)
    labels = np.arange(count, dtype=np.int64) % 10
    write_set(split + "-label.tfrecord", images[:nlabeled], labels[:nlabeled])
    write_set(split + "-unlabel.tfrecord", images[nlabeled:], labels[nlabeled:])
    write_set(os.path.join(root, "bench-test.tfrecord"), images[:1000], labels[:1000])
    for shard in range(8):
        rows = slice(nlabeled + shard, None, 8)
        write_set(os.path.join(root, f"bench-shard{shard}.tfrecord"), images[rows], labels[rows])
    with open(os.path.join(root, "bench-meta.json"), "w") as f:
        f.write('{"name": "bench", "nclass": 10, "height": 32, "width": 32, "channels": 3, "flip": true}')
    return name


def measure(data, batch: int, steps: int, warmup: int) -> float:
    labeled = iter(data.train_labeled(batch))
    unlabeled = iter(data.train_unlabeled(batch))
    for _ in range(warmup):
        next(labeled), next(unlabeled)
    start = time.perf_counter()
    for _ in range(steps):
        x, u = next(labeled), next(unlabeled)
    _ = (x["image"].numpy(), u["image"].numpy())
    return steps * 3 * batch / (time.perf_counter() - start)


def main(argv):
    from libml.data import load_ssl
    root = FLAGS.data_dir
    t0 = time.perf_counter()
    name = prepare(root, FLAGS.count, FLAGS.nlabeled)
    print(f"dataset {name} under {root} ready in {time.perf_counter() - t0:.1f}s")
    shards = [os.path.join(root, f"bench-shard{i}.tfrecord") for i in range(8)]
    print(f"{'mode':10s} {'B':>4s} {'images/s':>10s} {'build s':>8s}")
    for mode in FLAGS.modes:
        t0 = time.perf_counter()
        data = load_ssl(name, root, seed=0, cache=(mode == "cached"), parallel=FLAGS.parallel or None,
                        unlabeled_files=shards if mode == "sharded" else None)
        rate = measure(data, FLAGS.batch, FLAGS.steps, FLAGS.warmup)
        print(f"{mode:10s} {FLAGS.batch:4d} {rate:10.0f} {time.perf_counter() - t0:8.1f}", flush=True)


if __name__ == "__main__":
    absl_run(main)
