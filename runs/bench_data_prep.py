"""Benchmark: data preparation at full CIFAR-10 size, from a synthetic cifar-10-python.tar.gz.

    .venv/bin/python -m runs.bench_data_prep [--workdir=/tmp/bench_data_prep]

Writes a 50,000 + 10,000 image archive in the real pickle layout (random pixels, so PNGs are
larger than real CIFAR ones: an upper bound), then times, in one process:
create_datasets cifar10, create_split --seed=1 --size=250, check_split cifar10.1@250-5000,
create_mismatch --mismatch=75.
"""
import os
import shutil
import time

from absl import flags

from data_prep import check_split, create_datasets, create_mismatch, create_split
from libml.base import cli
from libml.data import names
from runs.bench_fixtures import write_cifar_archive

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", "/tmp/bench_data_prep", "Scratch folder (deleted first).", flag_values=FLAGS)


def timed(label, fn):
    start = time.perf_counter()
    result = fn()
    print(f"BENCH {label}: {time.perf_counter() - start:.1f} s", flush=True)
    return result


def main(argv):
    cli.parse(FLAGS, argv)
    root = FLAGS.workdir
    shutil.rmtree(root, ignore_errors=True)
    archives, data = os.path.join(root, "archives"), os.path.join(root, "data")
    timed("write synthetic archive (60k images)",
          lambda: write_cifar_archive(archives, "cifar10", per_batch=10000, n_test=10000))
    timed("create_datasets cifar10 (60k PNG records)",
          lambda: create_datasets.main(["cd", "cifar10", f"--archive_dir={archives}", f"--data_dir={data}"]))
    timed("create_split seed=1 size=250 (50k records)",
          lambda: create_split.main(["cs", "--seed=1", "--size=250", names.ssl_prefix(data, "cifar10"),
                                     names.train_path(data, "cifar10")]))
    timed("check_split cifar10.1@250-5000 (60k images hashed)",
          lambda: check_split.main(["ck", "--dataset=cifar10.1@250-5000", f"--data_dir={data}"]))
    timed("create_mismatch cifar10 75% (2400 labels, 18400 unlabeled, 6000 test)",
          lambda: create_mismatch.main(["cm", "--mismatch=75", f"--data_dir={data}"]))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    cli.run(main, FLAGS)
