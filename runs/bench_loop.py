"""Loop overhead of the trainer: evaluation, summaries and checkpoints at the default cadence
(report and save every 64 kimg = 1024 steps at batch 64) against the bare training steps.

    python -m runs.bench_loop [--filters=32 --repeat=4 --batch=64 --steps=30]

On synthetic CIFAR-sized data (32x32x3; 250 labeled, 5000 validation, 10000 test images, the
sizes of cifar10.3@250-5000), it times:
  step    the bare compiled step (train_fn calls only), median over --steps after warm-up;
  loop    the trainer's own loop (_train_period: progress bar, summing outputs) per step;
  report  one evaluation + summaries + accuracy.json (_report);
  save    one checkpoint (the trainer's save: finite check of every variable, then model +
          optimizer + iterators written under a new name, the index rewritten).
Overhead at the default cadence = (1024 (loop - step) + report + save) / (1024 loop + report + save).
"""
import os
import statistics
import sys
import tempfile
import time

from absl import flags  # noqa: E402

from libml.base import cli  # noqa: E402
from realmix_tf import registry  # noqa: E402

registry.define_flags("realmix", flags.FLAGS)       # --filters, --repeat, --batch, ...
flags.DEFINE_integer("steps", 30, "Timed steps (bare and loop each).")
flags.DEFINE_integer("report_steps", 1024, "Steps per report/save period to extrapolate to.")
FLAGS = flags.FLAGS


def main(_):
    import tensorflow as tf
    from libml.run.checkpoints import make_checkpoint
    from libml.train.config import TrainConfig
    from libml.run.runfolder import RunFolder
    from runs.bench_fixtures import make_ssl_dataset

    work = tempfile.mkdtemp(prefix="bench_loop_")
    t0 = time.perf_counter()
    toy = make_ssl_dataset(work, name="synth", nclass=10, nlabeled=250, nunlabeled=10000,
                           nvalid=5000, ntest=10000, size=32)
    print(f"data: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    config = TrainConfig(dataset=toy.name, data_dir=toy.root, train_dir=os.path.join(work, "exp"),
                         batch=FLAGS.batch, filters=FLAGS.filters, repeat=FLAGS.repeat,
                         train_kimg=65536, progress=True, export=False)
    trainer = registry.make_trainer("realmix", config)
    folder = RunFolder(trainer.run_dir, keep=2).open(trainer._args())
    trainer.iterators = trainer._make_iterators()
    ckpt = make_checkpoint(trainer.model, trainer.iterators)
    writer = tf.summary.create_file_writer(trainer.tf_dir)
    fn = trainer._get_train_fn()
    for _ in range(3):                                     # trace + warm-up
        fn()["losses/xe"].numpy()

    bare = []
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        fn()["losses/xe"].numpy()
        bare.append(time.perf_counter() - start)
    step_time = statistics.median(bare)

    step = int(trainer.model.step.numpy())
    start = time.perf_counter()
    means, step = trainer._train_period(step, step + FLAGS.steps * FLAGS.batch, folder, ckpt)
    loop_time = (time.perf_counter() - start) / FLAGS.steps

    trainer.reports.report(writer, step, means)                     # first report traces the eval
    reports = []
    for _ in range(2):
        start = time.perf_counter()
        trainer.reports.report(writer, step, means)
        reports.append(time.perf_counter() - start)
    report_time = min(reports)
    saves = []
    for i in range(3):
        start = time.perf_counter()
        trainer._save(folder, ckpt, step + i)
        saves.append(time.perf_counter() - start)
    save_time = statistics.median(saves)
    size = sum(os.path.getsize(os.path.join(trainer.tf_dir, f)) for f in os.listdir(trainer.tf_dir)
               if f.startswith(f"model.ckpt-{step + 2}."))

    n = FLAGS.report_steps
    period = n * loop_time + report_time + save_time
    overhead = (n * max(loop_time - step_time, 0) + report_time + save_time) / period
    print(f"model WRN filters={FLAGS.filters} repeat={FLAGS.repeat}, batch {FLAGS.batch}")
    print(f"bare step        {step_time * 1e3:9.1f} ms  (median of {FLAGS.steps})")
    print(f"loop step        {loop_time * 1e3:9.1f} ms  (mean of {FLAGS.steps}, incl. progress bar)")
    print(f"report           {report_time:9.2f} s   (eval 250 + 5000 + 10000 images, summaries, json)")
    print(f"checkpoint save  {save_time:9.2f} s   ({size / 2**20:.1f} MiB)")
    print(f"period of {n} steps: {period / 60:.1f} min; loop overhead {100 * overhead:.2f} %")
    folder.close()


if __name__ == "__main__":
    cli.run(main)
