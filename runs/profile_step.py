"""Where the RealMix train step's op time goes, from a tf.profiler trace of one step.

    python -m runs.profile_step --precisions=float32,mixed_bfloat16 [--batch=64 --filters=32]

For each precision: two untimed steps (tracing), then one step under `tf.profiler`; the op
events of TensorFlow's executor threads (`tf_Compute/*` lines of the host plane; the
enclosing `ExecutorState::Process` / `ParallelFor` events are not counted twice) are summed
by family: convolution forward (oneDNN fuses the residual add into it), convolution backward
(input and filter gradients), batch norm, leaky ReLU, copies (concat/split/slice/gather/...),
casts, optimizer / EMA / weight decay, other. Shares are of the summed op time of both
threads; the wall time of a step is in runs/bench_step. `ONEDNN_VERBOSE=1` shows which oneDNN
kernel each convolution uses.
"""
import collections
import glob
import os
import shutil
import tempfile

import tensorflow as tf
from absl import flags

from libml.base import cli

from realmix_tf import gamma_auto

from libml.base import machine as platform
from realmix_tf.realmix import RealMix
from runs.bench_step import random_batch

FLAGS = flags.FLAGS
# --precisions, --size and the RealMix flags (--batch, --filters, --repeat, --tsa, --gamma)
# are runs.bench_step's.
flags.DEFINE_integer("top", 5, "Largest 'other' ops listed.")

FAMILIES = ("conv forward", "conv backward", "batch norm", "leaky relu", "copies", "cast",
            "optimizer / EMA / WD", "other")
NESTING = ("ExecutorState::Process", "ParallelFor")      # events that contain op events


def family(name: str):
    """The family of an op event's name ('node/path:OpType' or a node path), None for the
    events that enclose others."""
    if name in NESTING:
        return None
    n = name.lower()
    if "conv" in n and ("backprop" in n or n.startswith("gradient_tape")):
        return "conv backward"
    if "conv" in n:
        return "conv forward"
    if "batchnorm" in n:
        return "batch norm"
    if "leakyrelu" in n:
        return "leaky relu"
    if any(k in n for k in ("concat", "split", "slice", "gather", "transpose", "reshape",
                            "pack", "tile", "identity")):
        return "copies"
    if "cast" in n:
        return "cast"
    if any(k in n for k in ("adam", "assign", "applyadam", "resourceapply")):
        return "optimizer / EMA / WD"
    return "other"


def op_times(xplane_path: str) -> collections.Counter:
    """Picoseconds per op event name on the executor threads of the host plane."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    times = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name.startswith("tf_Compute"):
                for event in line.events:
                    times[plane.event_metadata[event.metadata_id].name] += event.duration_ps
    return times


def shares(times: collections.Counter):
    """({family: share of the op time}, total op seconds, {other op: share})."""
    by_family = collections.Counter()
    for name, ps in times.items():
        fam = family(name)
        if fam is not None:
            by_family[fam] += ps
    total = sum(by_family.values()) or 1
    others = collections.Counter({k: v / total for k, v in times.items()
                                  if family(k) == "other"})
    return {f: by_family[f] / total for f in FAMILIES}, total / 1e12, others


def profile(precision: str, logdir: str) -> collections.Counter:
    model = RealMix(10, (FLAGS.size, FLAGS.size, 3), filters=FLAGS.filters, repeat=FLAGS.repeat,
                    precision=precision, tsa=FLAGS.tsa.replace("_schedule", ""),
                    gamma=gamma_auto.parse_gamma(FLAGS.gamma), warmup_kimg=1)
    data = random_batch(FLAGS.batch, FLAGS.size)
    step = tf.function(model.train_step)
    for _ in range(2):
        tf.nest.map_structure(lambda t: t.numpy(), step(data))
    tf.profiler.experimental.start(logdir)
    try:
        tf.nest.map_structure(lambda t: t.numpy(), step(data))
    finally:
        tf.profiler.experimental.stop()
    (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    return op_times(path)


def main(argv):
    del argv
    for line in platform.describe():
        print(line)
    print(f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for precision in FLAGS.precisions:
        logdir = tempfile.mkdtemp(prefix="profile_step_")
        try:
            fractions, seconds, others = shares(profile(precision, logdir))
        finally:
            shutil.rmtree(logdir, ignore_errors=True)
        print(f"{precision}: {seconds:.2f} s of op time (both threads) in one step, batch "
              f"{FLAGS.batch}, filters {FLAGS.filters}, repeat {FLAGS.repeat}")
        for fam in FAMILIES:
            print(f"  {fam:22s} {100 * fractions[fam]:5.1f} %")
        if others:
            print("  largest other ops: " + "; ".join(
                f"{k} {100 * v:.1f} %" for k, v in others.most_common(FLAGS.top)))


if __name__ == "__main__":
    cli.run(main)
