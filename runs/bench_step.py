"""Benchmark of the RealMix train step against the bare compute it contains.

RealMix step (WRN-28-2, batch B labeled + B unlabeled x 2 views) =
  2 guess passes of B (training-mode BN, no gradient) + forward/backward on 3B + Adam/WD/EMA.
Bare compute = the same network: two no-gradient training-mode passes on B, plus a supervised
forward+backward on 3B images with an Adam step (no MixUp, no interleave, no WD, no EMA).

  python -m runs.bench_step --precisions=float32,mixed_bfloat16 --tsa=linear --gamma=0.6

Prints s/step (median and best of the rounds), steps/s and images/s (labeled images: B per
step) for each precision, the ratio RealMix/bare, and the bf16 speed-up. Warm-up steps
(tracing) are excluded; the two steps alternate so that other jobs slow both alike.
"""
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from libml import cli  # noqa: E402
from libml.config import PRECISIONS  # noqa: E402
from libml import gamma_auto  # noqa: E402
from libml.errors import UserError  # noqa: E402
from realmix_tf import registry  # noqa: E402
from realmix_tf.realmix import RealMix  # noqa: E402

FLAGS = flags.FLAGS
# The RealMix command line's flags: this script reuses --batch, --filters, --jit_compile,
# --tsa and --gamma from them and adds its own below.
registry.define_flags("realmix", FLAGS)
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Precisions to measure.")
flags.DEFINE_integer("steps", 2, "Timed steps per round.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (tracing, allocator warm-up).")
flags.DEFINE_integer("repeats", 6, "Rounds alternating the RealMix and the bare step; the "
                     "median and the best round are reported.")
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


def seconds_per_step(step, data, steps):
    """(wall, cpu) seconds per step; cpu = process CPU time of all threads, less sensitive to
    other jobs than the wall clock."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = step(data)
    tf.nest.map_structure(lambda t: t.numpy(), out)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def measure(precision):
    """Per-step seconds of each step function: `repeats` rounds that alternate the two, so
    that load from other jobs hits both alike. Returns {name: [seconds per round]}."""
    model = RealMix(10, (FLAGS.size, FLAGS.size, 3), filters=FLAGS.filters,
                    precision=precision, jit_compile=FLAGS.jit_compile,
                    tsa=FLAGS.tsa.replace("_schedule", ""),
                    gamma=gamma_auto.parse_gamma(FLAGS.gamma),
                    batched_passes=FLAGS.batched_passes, warmup_kimg=1)
    data = random_batch(FLAGS.batch, FLAGS.size)
    steps = {"realmix": tf.function(model.train_step), "bare": bare_step_fn(model)}
    for fn in steps.values():
        seconds_per_step(fn, data, max(FLAGS.warmup, 1))
    rounds = {name: [] for name in steps}
    for _ in range(FLAGS.repeats):
        for name, fn in steps.items():
            rounds[name].append(seconds_per_step(fn, data, FLAGS.steps))
    return rounds


def main(argv):
    del argv
    for p in FLAGS.precisions:
        if p not in PRECISIONS:
            raise UserError(f"unknown precision {p!r}: use {', '.join(PRECISIONS)}")
    medians = {}
    for precision in FLAGS.precisions:
        rounds = measure(precision)
        med = medians[precision] = {k: float(np.median([w for w, _ in v]))
                                    for k, v in rounds.items()}
        best = {k: min(w for w, _ in v) for k, v in rounds.items()}
        cpu = {k: float(np.median([c for _, c in v])) for k, v in rounds.items()}
        print(f"{precision:15s} realmix {med['realmix']:.3f} s/step (median; best "
              f"{best['realmix']:.3f}) = {1 / med['realmix']:.2f} steps/s, "
              f"{FLAGS.batch / med['realmix']:.1f} img/s | bare {med['bare']:.3f} (best "
              f"{best['bare']:.3f}) | realmix/bare wall {med['realmix'] / med['bare']:.3f} "
              f"median, {best['realmix'] / best['bare']:.3f} best; CPU time "
              f"{cpu['realmix']:.2f}/{cpu['bare']:.2f} s = {cpu['realmix'] / cpu['bare']:.3f}",
              flush=True)
    if "float32" in medians and "mixed_bfloat16" in medians:
        print(f"bf16 speed-up of the RealMix step (medians): "
              f"{medians['float32']['realmix'] / medians['mixed_bfloat16']['realmix']:.2f}x")


if __name__ == "__main__":
    cli.run(main)
