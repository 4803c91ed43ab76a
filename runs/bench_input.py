"""Benchmark of the SSL input pipeline: images per second delivered to the training step.

One step = one labeled batch (B augmented images) + one unlabeled batch (B images x 2 views),
decoded, augmented and scaled to [-1, 1]; the figure counts 3B images per step.

    python -m runs.bench_input                       # 50,000 CIFAR-sized images, B=64
    python -m runs.bench_input --modes=cached --steps=500

The synthetic dataset (runs.bench_fixtures: CIFAR-like images, PNGs of CIFAR's size) is
written once under --data_dir and reused.
"""
import time

from absl import flags

from libml.base import cli
from runs.bench_fixtures import make_ssl_dataset

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
    from libml.data.pipeline import load_ssl
    root = FLAGS.data_dir
    t0 = time.perf_counter()
    bench = make_ssl_dataset(root, "bench", nlabeled=FLAGS.nlabeled, nunlabeled=FLAGS.count - FLAGS.nlabeled,
                             ntest=1000, shards=8)
    name, shards = bench.name, bench.shards
    print(f"dataset {name} under {root} ready in {time.perf_counter() - t0:.1f}s")
    print(f"{'mode':10s} {'B':>4s} {'images/s':>10s} {'build s':>8s}")
    for mode in FLAGS.modes:
        t0 = time.perf_counter()
        data = load_ssl(name, root, seed=0, cache=(mode == "cached"), parallel=FLAGS.parallel or None,
                        unlabeled_files=shards if mode == "sharded" else None)
        rate = measure(data, FLAGS.batch, FLAGS.steps, FLAGS.warmup)
        print(f"{mode:10s} {FLAGS.batch:4d} {rate:10.0f} {time.perf_counter() - t0:8.1f}", flush=True)


if __name__ == "__main__":
    cli.run(main)
