"""Benchmark of the RealMix train step against the bare compute it contains.

RealMix step (WRN-28-2, batch B labeled + B unlabeled x 2 views) =
  2 guess passes of B (training-mode BN, no gradient) + forward/backward on 3B + Adam/WD/EMA.
Bare compute = the same network: two no-gradient training-mode passes on B, plus a supervised
forward+backward on 3B images with an Adam step (no MixUp, no interleave, no WD, no EMA).

  python -m runs.bench_step --precisions=float32,mixed_bfloat16 --tsa=linear --gamma=0.6

Prints steps/s and images/s (labeled images per second: B per step) for each precision, the
ratio RealMix/bare, and the bf16 speed-up. Warm-up steps (tracing) are excluded.
"""
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from libml.errors import UserError, absl_run  # noqa: E402
from libml.ssl import PRECISIONS  # noqa: E402
from realmix_tf.realmix import RealMix  # noqa: E402

FLAGS = flags.FLAGS
# Importing realmix_tf.realmix defined the trainer's flags; this script reuses --batch,
# --filters, --jit_compile, --tsa and --gamma from them and adds its own below.
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Precisions to measure.")
flags.DEFINE_integer("steps", 3, "Timed steps per measurement.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (tracing, allocator warm-up).")
flags.DEFINE_integer("repeats", 4, "Alternating measurements of each step; the fastest is kept "
                     "(robust to other jobs on a shared machine).")
flags.DEFINE_integer("size", 32, "Image size.")
flags.DEFINE_bool("batched_passes", True, "Run BN chunks as one grouped call (False: "
                  "separate calls, as the released code).")

def random_batch(batch, size, seed=0):
    rng = np.random.RandomState(seed)
    labeled = {"image": tf.constant(rng.uniform(-1, 1, (batch, size, size, 3)), tf.float32),
               "label": tf.constant(rng.randint(0, 10, batch), tf.int64)}
    unlabeled = {"image": tf.constant(rng.uniform(-1, 1, (batch, 2, size, size, 3)), tf.float32)}
    return labeled, unlabeled


def bare_step_fn(model):
    """The compute inside a RealMix step without the algorithm: 2 no-grad passes on B, one
    supervised forward+backward on 3B, one Adam step."""
    net, optimizer = model.net, model.optimizer

    @tf.function(jit_compile=model.use_jit)
    def losses_and_grads(x3, labels3, u1, u2):
        guess = [net(u1, training=True, update_bn_stats=False),
                 net(u2, training=True, update_bn_stats=False)]
        with tf.GradientTape() as tape:
            logits = net(x3, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels3, logits))
            loss = model.scale_loss(loss)
        return tape.gradient(loss, net.trainable_variables), loss + 0 * guess[0][0, 0] \
            + 0 * guess[1][0, 0]

    @tf.function
    def step(data):
        labeled, unlabeled = data
        x3 = tf.concat([labeled["image"], unlabeled["image"][:, 0], unlabeled["image"][:, 1]], 0)
        labels3 = tf.tile(labeled["label"], [3])
        grads, loss = losses_and_grads(x3, labels3, unlabeled["image"][:, 0],
                                       unlabeled["image"][:, 1])
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return loss

    return step


def seconds_per_step(step, data, steps, warmup):
    for _ in range(warmup):
        out = step(data)
    tf.nest.map_structure(lambda t: t.numpy(), out)
    start = time.perf_counter()
    for _ in range(steps):
        out = step(data)
    tf.nest.map_structure(lambda t: t.numpy(), out)
    return (time.perf_counter() - start) / steps


def measure(precision):
    model = RealMix(10, (FLAGS.size, FLAGS.size, 3), filters=FLAGS.filters,
                    precision=precision, jit_compile=FLAGS.jit_compile, tsa=FLAGS.tsa.replace("_schedule", ""),
                    gamma=FLAGS.gamma, batched_passes=FLAGS.batched_passes, warmup_kimg=1)
    data = random_batch(FLAGS.batch, FLAGS.size)
    steps = {"realmix": tf.function(model.train_step), "bare": bare_step_fn(model)}
    best = {name: float("inf") for name in steps}
    for repeat in range(FLAGS.repeats):
        for name, fn in steps.items():
            warmup = FLAGS.warmup if repeat == 0 else 1
            best[name] = min(best[name], seconds_per_step(fn, data, FLAGS.steps, warmup))
    return best


def main(argv):
    del argv
    for p in FLAGS.precisions:
        if p not in PRECISIONS:
            raise UserError(f"unknown precision {p!r}: use {', '.join(PRECISIONS)}")
    results = {}
    for precision in FLAGS.precisions:
        results[precision] = measure(precision)
        r = results[precision]
        print(f"{precision:15s} realmix {r['realmix']:.3f} s/step ({1 / r['realmix']:.2f} steps/s,"
              f" {FLAGS.batch / r['realmix']:.1f} img/s)  bare {r['bare']:.3f} s/step "
              f"({1 / r['bare']:.2f} steps/s)  realmix/bare {r['realmix'] / r['bare']:.3f}",
              flush=True)
    if "float32" in results and "mixed_bfloat16" in results:
        print(f"bf16 speed-up of the RealMix step: "
              f"{results['float32']['realmix'] / results['mixed_bfloat16']['realmix']:.2f}x")


if __name__ == "__main__":
    absl_run(main)
