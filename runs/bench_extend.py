"""Benchmark of the Extend step (issue 3): time, peak memory and disk size of extending a
CIFAR-10-sized unlabeled set, and throughput of the unlabeled training stream on the
extension against the unextended set (issue 3 goal: extended / unextended >= 0.8), reported
as `ratio_vs_plain_cached_*` (unextended set decoded in RAM, the default for it) and
`ratio_vs_plain_streamed_*` (unextended set streamed from its record file).

    .venv/bin/python -m runs.bench_extend --root=/tmp/bench_extend [--copies=50] [--aug=erase]

Synthetic, CIFAR-like images (runs.bench_fixtures: smooth 6x6 colour fields upsampled to 32x32
plus noise; their PNGs average ~2.4 KB, about CIFAR-10's size) stand in for the real set: the cost is PNG
encoding, which depends on the image size, not the content class. The extension runs as a
separate process (the real command line) so that its peak RSS is measured alone.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import flags

from libml.base import cli
from runs.bench_fixtures import make_ssl_dataset

FLAGS = flags.FLAGS
flags.DEFINE_string("root", "/tmp/bench_extend", "Scratch data folder (needs ~7 GB for 50 copies).")
flags.DEFINE_integer("images", 49750, "Unlabeled training images (CIFAR-10 at 250 labels: 49,750).")
flags.DEFINE_integer("copies", 50, "Copies to write.")
flags.DEFINE_string("aug", "erase", "Augmentation.")
flags.DEFINE_integer("batch", 64, "Batch of the training-stream throughput test.")
flags.DEFINE_integer("steps", 300, "Batches timed per stream (after 30 warm-up batches).")
flags.DEFINE_integer("rounds", 5, "Alternating rounds of the three streams; medians are reported.")
flags.DEFINE_bool("skip_extend", False, "Reuse an existing extension (stream throughput only).")
flags.DEFINE_integer("png_compression", -1, "Passed to the extension (-1: its default).")

DATASET = "synth.1@250-0"    # no validation records: all 49,750 unlabeled images are extended


def make_source(root: str, n: int) -> None:
    make_ssl_dataset(root, "synth", nlabeled=250, nunlabeled=n, nvalid=0, ntest=1000)


def run_extend(root: str) -> dict:
    command = [sys.executable, "-m", "data_prep.extend_unlabeled", f"--dataset={DATASET}",
               f"--copies={FLAGS.copies}", f"--aug={FLAGS.aug}", "--seed=0", "--overwrite",
               f"--data_dir={root}"]
    if FLAGS.png_compression >= 0:
        command.append(f"--png_compression={FLAGS.png_compression}")
    start = time.time()
    subprocess.run(command, check=True)
    seconds = time.time() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"command": " ".join(command[1:]), "seconds": seconds, "peak_rss_gib": peak_kib / 2**20}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stream_rate(data, batch: int, steps: int):
    """(images/s, CPU microseconds per image) of the unlabeled training stream.

    CPU time per image is the steadier figure on a shared machine: wall-clock rates move
    with the other jobs' load.
    """
    it = iter(data.train_unlabeled(batch))
    for _ in range(30):
        next(it)
    start, cpu = time.time(), _cpu_seconds()
    for _ in range(steps):
        next(it)["image"].numpy()
    images = steps * batch
    return images / (time.time() - start), (_cpu_seconds() - cpu) / images * 1e6


def compare_streams(streams: dict, batch: int, steps: int, rounds: int) -> dict:
    """Medians of `rounds` alternating measurements of each stream, and the issue-3 ratios.

    Ratio = extended throughput / unextended throughput (goal: >= 0.8), from wall-clock rates
    and from CPU time per image (the inverse ratio of costs). The streams run back to back in
    each round, so they see the same machine load as closely as possible.
    """
    rates = {name: [] for name in streams}
    for _ in range(rounds):   # alternate, then take medians: the load of other jobs drifts
        for name, ssl in streams.items():
            rates[name].append(stream_rate(ssl, batch, steps))
    out = {}
    for name, values in rates.items():
        out[f"stream_{name}_img_s"] = float(np.median([v[0] for v in values]))
        out[f"stream_{name}_cpu_us_per_img"] = float(np.median([v[1] for v in values]))
        out[f"stream_{name}_img_s_rounds"] = [round(v[0]) for v in values]
    for base in ("plain_cached", "plain_streamed"):
        # Per-round ratios too: both streams of a round ran under (nearly) the same load.
        per_round = [e[0] / b[0] for e, b in zip(rates["extended"], rates[base])]
        out[f"ratio_vs_{base}_wall"] = out["stream_extended_img_s"] / out[f"stream_{base}_img_s"]
        out[f"ratio_vs_{base}_wall_median_of_rounds"] = float(np.median(per_round))
        out[f"ratio_vs_{base}_cpu"] = (out[f"stream_{base}_cpu_us_per_img"]
                                       / out["stream_extended_cpu_us_per_img"])
    return out


def main(_):
    from libml.data import pipeline as data
    from libml.data import extend
    from libml.data import names
    root = FLAGS.root
    make_source(root, FLAGS.images)
    d = names.parse_dataset_name(DATASET)
    report = {"images": FLAGS.images, "copies": FLAGS.copies, "aug": FLAGS.aug,
              "source_bytes": os.path.getsize(d.unlabel_path(root))}
    if not FLAGS.skip_extend:
        report.update(run_extend(root))
    files = extend.extended_unlabeled_files(DATASET, root, FLAGS.copies, FLAGS.aug, 0)
    out_bytes = sum(os.path.getsize(f) for f in files)
    report.update(records=FLAGS.copies * FLAGS.images, output_gib=out_bytes / 2**30,
                  bytes_ratio=out_bytes / (FLAGS.copies * report["source_bytes"]))
    if "seconds" in report:
        report["images_per_second"] = report["records"] / report["seconds"]
    streams = {"plain_cached": data.load_ssl(DATASET, root, seed=0),
               "plain_streamed": data.load_ssl(DATASET, root, seed=0, cache=False),
               "extended": data.load_ssl(DATASET, root, seed=0, unlabeled_files=files)}
    report["load_average_before_streams"] = os.getloadavg()
    report.update(compare_streams(streams, FLAGS.batch, FLAGS.steps, FLAGS.rounds))
    report["load_average"] = os.getloadavg()
    report["disk_free_gib"] = shutil.disk_usage(root).free / 2**30
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    cli.run(main)
