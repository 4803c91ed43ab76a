"""Benchmark of the grouped ("ghost batch") BatchNorm + LeakyReLU of the interleaved passes:
the way libml.nn.wrn.BatchNorm does it against two ways that avoid the split and concat.

    python -m runs.bench_bn [--batch=192 --groups=3 --rounds=5]

Each variant normalises each of --groups equal chunks of a batch with the chunk's own
statistics, then applies LeakyReLU(0.1); one forward + backward (gradients of x, gamma, beta)
at the three WRN-28-2 stage shapes (32x32x32, 16x16x64, 8x8x128) is one call:
  fused     tf.split, TensorFlow's fused kernel per chunk, tf.concat (libml.nn.wrn.BatchNorm);
  moments   one reshape to [groups, rows, C], tf.nn.moments, one broadcast affine (no copies);
  xla       the same maths in a jit-compiled function (XLA fuses it into a few loops).
The variants alternate round by round, so that other jobs slow them alike; the gradients are
checked against `fused` first (relative error of the norm < 1e-3). Prints the median seconds per round (3 calls of each shape).
"""
import statistics
import time

from absl import flags

from libml.base import cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 192, "Rows of the batch (the interleaved step: 3 chunks of 64).")
flags.DEFINE_integer("groups", 3, "Chunks with their own statistics.")
flags.DEFINE_integer("rounds", 5, "Rounds alternating the variants.")
SHAPES = ((32, 32, 32), (16, 16, 64), (8, 8, 128))
EPSILON, SLOPE = 1e-3, 0.1


def variants(groups):
    import tensorflow as tf

    def fused(x, gamma, beta):
        outputs = [tf.compat.v1.nn.fused_batch_norm(chunk, gamma, beta, epsilon=EPSILON,
                                                    is_training=True)[0]
                   for chunk in tf.split(x, groups)]
        return tf.nn.leaky_relu(tf.concat(outputs, axis=0), SLOPE)

    def moments(x, gamma, beta):
        chunks = tf.reshape(x, [groups, -1, x.shape[-1]])
        mean, variance = tf.nn.moments(chunks, [1], keepdims=True)
        scale = gamma * tf.math.rsqrt(variance + EPSILON)
        y = chunks * scale + (beta - mean * scale)
        return tf.nn.leaky_relu(tf.reshape(y, tf.shape(x)), SLOPE)

    return {"fused": fused, "moments": moments,
            "xla": tf.function(moments, jit_compile=True)}


def forward_backward(fn):
    import tensorflow as tf

    @tf.function
    def call(x, gamma, beta, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            loss = tf.reduce_sum(fn(x, gamma, beta) * dy)
        return tape.gradient(loss, [x, gamma, beta])
    return call


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf
    rng = np.random.RandomState(0)
    inputs = []
    for shape in SHAPES:
        full = (FLAGS.batch,) + shape
        inputs.append([tf.constant(rng.normal(size=full), tf.float32),
                       tf.constant(1 + rng.normal(size=shape[-1]), tf.float32),
                       tf.constant(rng.normal(size=shape[-1]), tf.float32),
                       tf.constant(rng.normal(size=full), tf.float32)])
    calls = {name: forward_backward(fn) for name, fn in variants(FLAGS.groups).items()}
    for args in inputs:
        want = calls["fused"](*args)
        for name, call in calls.items():
            got = call(*args)
            # Relative to the norm: a value that rounds to the other side of LeakyReLU's kink
            # gets the other slope, so single elements may differ by 10x.
            worst = max(float(tf.norm(a - b) / tf.norm(a)) for a, b in zip(want, got))
            if worst > 1e-3:
                raise SystemExit(f"{name} disagrees with fused: relative error {worst:.2e}")
    seconds = {name: [] for name in calls}
    for _ in range(FLAGS.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(3):
                for args in inputs:
                    call(*args)[0].numpy()
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["fused"])
    print(f"BN + LeakyReLU, forward + backward, batch {FLAGS.batch} in {FLAGS.groups} groups, "
          f"shapes {', '.join('x'.join(map(str, s)) for s in SHAPES)}; {FLAGS.rounds} rounds")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:8s} {median:.3f} s/round (median; best {min(values):.3f}) "
              f"{median / base:.2f}x fused")


if __name__ == "__main__":
    cli.run(main)
