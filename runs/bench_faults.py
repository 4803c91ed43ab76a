"""Cost of the checks that keep a run alive (docs/usage_reliability.md), measured A/B in one
process, alternating, so that the ratios hold on a loaded machine.

    python -m runs.bench_faults [--filters=32 --repeat=4 --batch=64 --steps=20 --rounds=5]

On synthetic CIFAR-sized data (32x32x3) it times:
  step    the trainer's compiled step with the in-graph finite check of the losses, against the
          same step without it (median per step over --rounds x --steps);
  save    a checkpoint save with the finite check of every variable (RunFolder.save) against
          the bare write (checkpoint_files.save_checkpoint);
  resume  the finite check of one checkpoint read back from disk (checkpoint_is_finite), done
          once per resume.
"""
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from libml.base import cli  # noqa: E402
from realmix_tf import registry  # noqa: E402

registry.define_flags("realmix", flags.FLAGS)       # --filters, --repeat, --batch, ...
flags.DEFINE_integer("steps", 20, "Timed steps per round and variant.")
flags.DEFINE_integer("rounds", 5, "Alternations of the two variants.")
FLAGS = flags.FLAGS


def _timed(fn, count):
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(_):
    import tensorflow as tf
    from libml.run import checkpoints as checkpoint_files
    from libml.run import finite
    from libml.run.checkpoints import make_checkpoint
    from libml.train.config import TrainConfig
    from libml.run.runfolder import RunFolder
    from runs.bench_fixtures import make_ssl_dataset

    work = tempfile.mkdtemp(prefix="bench_faults_")
    toy = make_ssl_dataset(work, name="synth", nclass=10, nlabeled=250, nunlabeled=2000,
                           nvalid=500, ntest=500, size=32)
    config = TrainConfig(dataset=toy.name, data_dir=toy.root, train_dir=os.path.join(work, "exp"),
                         batch=FLAGS.batch, filters=FLAGS.filters, repeat=FLAGS.repeat,
                         train_kimg=65536, progress=False, export=False)
    trainer = registry.make_trainer("realmix", config)
    trainer.iterators = trainer._make_iterators()
    checked = trainer._get_train_fn()
    labeled_it, unlabeled_it = trainer.iterators
    strategy, model = trainer.strategy, trainer.model

    @tf.function
    def plain():
        outputs = strategy.run(model.train_step, args=((next(labeled_it), next(unlabeled_it)),))
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                for k, v in outputs.items()}

    variants = {"plain": lambda: plain()["losses/xe"].numpy(),
                "checked": lambda: checked()["losses/xe"].numpy()}
    for run in variants.values():                  # trace + warm-up
        _timed(run, 3)
    steps = {name: [] for name in variants}
    for _ in range(FLAGS.rounds):
        for name, run in variants.items():
            steps[name] += _timed(run, FLAGS.steps)
    step = {name: statistics.median(t) for name, t in steps.items()}

    folder = RunFolder(trainer.run_dir, keep=2).open(trainer._args())
    ckpt = make_checkpoint(trainer.model, trainer.iterators)
    variables = trainer._variables
    number = iter(range(1, 10 ** 6))
    saves = {"write": [], "check + write": []}
    for _ in range(FLAGS.rounds):
        saves["write"] += _timed(lambda: checkpoint_files.save_checkpoint(
            ckpt, folder.tf_dir, next(number), keep=2), 1)
        saves["check + write"] += _timed(lambda: folder.save(ckpt, next(number), variables), 1)
    save = {name: statistics.median(t) for name, t in saves.items()}
    check = statistics.median(_timed(lambda: finite.nonfinite_variables(variables), FLAGS.rounds))
    latest = checkpoint_files.latest_checkpoint(folder.tf_dir)
    resume = statistics.median(_timed(lambda: finite.checkpoint_is_finite(latest), FLAGS.rounds))
    folder.close()

    print(f"model WRN filters={FLAGS.filters} repeat={FLAGS.repeat}, batch {FLAGS.batch}, "
          f"{FLAGS.rounds} x {FLAGS.steps} steps per variant, alternating")
    print(f"step without check {step['plain'] * 1e3:9.1f} ms")
    print(f"step with check    {step['checked'] * 1e3:9.1f} ms   ratio {step['checked'] / step['plain']:.3f}")
    print(f"save (write)       {save['write']:9.3f} s")
    print(f"save (check+write) {save['check + write']:9.3f} s   ratio "
          f"{save['check + write'] / save['write']:.3f}; variable check alone {check * 1e3:.1f} ms")
    print(f"resume check       {resume * 1e3:9.1f} ms   (checkpoint_is_finite of one checkpoint)")
    print(f"machine load: {os.getloadavg()[0]:.2f}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
