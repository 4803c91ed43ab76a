"""Checks the GPU code paths in one command: the same RealMix steps on one GPU and on every
visible GPU (MirroredStrategy, --replica_mode=global: the NCCL all-gathers of the
cross-replica BatchNorm statistics, the cuDNN kernels), from the same initial weights on the
same global batch, and one table of the equivalence and the step time.

    python -m runs.gpu_check                        # a GPU host: 1 GPU vs all visible GPUs
    python -m runs.gpu_check --cpu_devices=2        # the same check on 2 logical CPU devices

Exit code 0 when the multi-device step equals the one-device step within --tolerance (float32
rounding: the largest difference of the losses of every step and of the trained net's
predictions on a probe batch after the steps), 1 when it does not; on a machine without GPU
(and without --cpu_devices) it says so and exits 0.
"""
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from libml.base import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("cpu_devices", 0, "Use N logical CPU devices instead of the GPUs "
                     "(0: the visible GPUs).")
flags.DEFINE_integer("batch", 64, "Global labeled batch (the unlabeled one is 2 views of it).")
flags.DEFINE_integer("filters", 32, "WRN width (32 = WRN-28-2).")
flags.DEFINE_integer("repeat", 4, "Residual blocks per stage.")
flags.DEFINE_integer("size", 32, "Image size.")
flags.DEFINE_integer("steps", 5, "Training steps compared (the first one, with tracing, is not "
                     "timed).")
flags.DEFINE_string("precision", "float32", "float32 (the equivalence is float32 rounding), "
                    "mixed_bfloat16 or mixed_float16.")
flags.DEFINE_float("tolerance", 1e-4, "Largest absolute difference of a loss or a predicted "
                   "probability that counts as equal.")

NO_GPU = ("no GPU visible: nothing to check here (run it on a GPU host; --cpu_devices=2 runs "
          "the same check on 2 logical CPU devices)")


def devices():
    """The device names to compare (one device vs all of them), or [] when there is none."""
    from libml.train import devices as distribute
    distribute.configure_devices(FLAGS.cpu_devices)
    import tensorflow as tf
    if FLAGS.cpu_devices:
        return [f"/cpu:{i}" for i in range(max(FLAGS.cpu_devices, 1))]
    return [d.name for d in tf.config.list_logical_devices("GPU")]


def compare(names):
    """{label: {"devices", "losses" [steps], "seconds" [steps - 1], "weights" {key: array}}}."""
    import numpy as np
    import tensorflow as tf
    from libml.train import devices as distribute
    from libml.run.checkpoints import make_checkpoint, model_variables, read_model
    from realmix_tf.realmix import RealMix

    rng = np.random.RandomState(0)
    b, s = FLAGS.batch, FLAGS.size
    data = ({"image": tf.constant(rng.uniform(-1, 1, (b, s, s, 3)), tf.float32),
             "label": tf.constant(rng.randint(0, 10, b), tf.int64)},
            {"image": tf.constant(rng.uniform(-1, 1, (b, 2, s, s, 3)), tf.float32)})
    probe = tf.constant(rng.uniform(-1, 1, (b, s, s, 3)), tf.float32)
    kwargs = dict(filters=FLAGS.filters, repeat=FLAGS.repeat, warmup_kimg=0, tsa="linear",
                  gamma=0.5, train_kimg=1, precision=FLAGS.precision)

    def build(strategy):
        with strategy.scope():
            model = RealMix(10, (s, s, 3), replica_mode=distribute.GLOBAL, **kwargs)
            model.classify(tf.zeros([2, s, s, 3]))          # builds the variables
        return model

    one = tf.distribute.OneDeviceStrategy(names[0])
    every = tf.distribute.MirroredStrategy(names)
    models = {f"1 device ({names[0]})": (one, build(one)),
              f"{len(names)} devices, global": (every, build(every))}
    weights = os.path.join(tempfile.mkdtemp(prefix="gpu_check-"), "init")
    prefix = make_checkpoint(models[next(iter(models))][1]).write(weights)
    results = {}
    for label, (strategy, model) in models.items():
        read_model(model, prefix)                           # the same initial weights
        parts = distribute.split_batch(strategy, data)     # the batch itself on one device
        step = tf.function(lambda d, m=model, st=strategy: st.run(m.train_step, args=(d,)))
        losses, seconds = [], []
        for i in range(FLAGS.steps):
            start = time.perf_counter()
            out = step(parts)
            loss = float(strategy.experimental_local_results(out["losses/overall"])[0].numpy())
            if i:
                seconds.append(time.perf_counter() - start)
            losses.append(loss)
        probs = model.classify(probe, ema=False)             # the trained net's predictions
        results[label] = dict(devices=len(strategy.extended.worker_devices), losses=losses,
                              seconds=seconds, probs=np.asarray(probs.numpy()),
                              weights={k: np.asarray(v.numpy())
                                       for k, v in model_variables(model).items()})
    return results


def table(results):
    """The printed lines: one row per setting, then the differences; and whether they agree."""
    import numpy as np
    (first, a), (second, c) = list(results.items())
    loss_diff = max(abs(x - y) for x, y in zip(a["losses"], c["losses"]))
    probs_diff = float(np.max(np.abs(a["probs"] - c["probs"])))
    # Weights for information: a bias before a BatchNorm has a zero gradient up to rounding,
    # which Adam scales up to about lr per step, so weights can differ by ~lr where the
    # network's outputs do not.
    weight_diff, worst = max(
        (float(np.max(np.abs(a["weights"][k].astype("f8") - c["weights"][k]))), k)
        for k in a["weights"] if a["weights"][k].size)
    lines = [f"RealMix, global batch {FLAGS.batch} (+{2 * FLAGS.batch} unlabeled), WRN "
             f"filters={FLAGS.filters} repeat={FLAGS.repeat}, {FLAGS.size}px, {FLAGS.precision}, "
             f"{FLAGS.steps} steps",
             f"{'setting':28s} {'devices':>7s} {'last loss':>12s} {'s/step':>9s} {'img/s':>8s}"]
    for label, r in results.items():
        median = float(np.median(r["seconds"])) if r["seconds"] else float("nan")
        lines.append(f"{label:28s} {r['devices']:7d} {r['losses'][-1]:12.6f} {median:9.4f} "
                     f"{FLAGS.batch / median:8.1f}")
    equal = max(loss_diff, probs_diff) <= FLAGS.tolerance
    lines.append(f"largest difference: loss {loss_diff:.2e}, predictions after the steps "
                 f"{probs_diff:.2e} (tolerance {FLAGS.tolerance:g}): "
                 f"{'EQUAL' if equal else 'DIFFERENT: the global step is not computed alike'}")
    lines.append(f"  (weights: {weight_diff:.2e} at {worst}; Adam turns rounding-size gradients "
                 f"into steps of about lr)")
    return lines, equal


def main(argv):
    del argv
    names = devices()
    if not names:
        print(NO_GPU)
        return 0
    if len(names) == 1:
        print(f"only one device ({names[0]}): the check compares it with itself; the "
              f"multi-device paths need two or more")
    lines, equal = table(compare(names))
    print("\n".join(lines))
    return 0 if equal else 1


if __name__ == "__main__":
    cli.run(main)
