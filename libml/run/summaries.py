"""What a run reports and how it is read back: TensorBoard scalars and histograms, the median
of the last n test accuracies (the paper's number), the `stats/accuracy.json` format, and the
one reader that `runs/` uses to get a run's test accuracies.

Summaries are written with the raw summary op and TensorBoard's plugin metadata, so the
`tensorboard` package is needed only to view them, not to train.

Files of a run folder read here:
    stats/accuracy_history.json   [{step, kimg, train_labeled, valid, test}, ...], one per report
    stats/accuracy.json           accuracy_stats(history): last01/10/20/50, error_lastNN,
                                  reports, kimg, last{train_labeled, valid, test}
    tf/events.out.tfevents.*      tag `accuracy` = test accuracy (`accuracy_test`: released RealMix),
                                  `_hparams_/session_start_info`: the run's hyper-parameters
"""
import glob
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from libml.base.errors import UserError
from libml.run.run_error import median_last  # noqa: F401  (THE median; re-exported)

MEDIAN_WINDOWS = (1, 10, 20, 50)
TEST_TAGS = ("accuracy", "accuracy_test")      # the test accuracy: ours, the released code's
HISTORY_FILE = os.path.join("stats", "accuracy_history.json")
STATS_FILE = os.path.join("stats", "accuracy.json")


# ---------------------------------------------------------------------------------------------
# Writing

def _plugin_metadata(plugin: str):
    from tensorflow.core.framework import summary_pb2
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin
    return metadata


def write_scalar(tag: str, value) -> None:
    """A TensorBoard scalar at the default writer's step."""
    tf.summary.write(tag, tf.constant(value, tf.float32), metadata=_plugin_metadata("scalars"))


def write_histogram(tag: str, values, buckets: int = 30) -> None:
    """A TensorBoard histogram ([buckets, 3] = left edge, right edge, count) of the finite
    `values` (NaN or Inf would make numpy's bucket edges fail)."""
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    counts, edges = np.histogram(values, bins=buckets)
    tensor = np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)
    tf.summary.write(tag, tf.constant(tensor, tf.float64), metadata=_plugin_metadata("histograms"))


HPARAM_TYPES = (bool, int, float, str)


def write_hparams(hparams: dict, trial_id: str) -> bool:
    """The run's hyper-parameters for TensorBoard's HPARAMS tab (its session start: one row per
    run, one column per hyper-parameter of any run, the run's scalars such as `accuracy` as the
    metric columns). Values that are not bool, int, float or str are written as text. False
    (nothing written) without the `tensorboard` package, which only views the summaries."""
    try:
        from tensorboard.plugins.hparams import api as hp
    except ImportError:
        return False
    values = {k: (v if isinstance(v, HPARAM_TYPES) else str(v)) for k, v in hparams.items()}
    return bool(hp.hparams(values, trial_id=trial_id))


# ---------------------------------------------------------------------------------------------
# Statistics (pure)

def finite_or_none(x) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def median_accuracies(test_accuracies: Sequence[Optional[float]]) -> dict:
    """Median test accuracy of the last 1/10/20/50 reports (the paper reports last20) and the
    matching error rates, as libml's extract_accuracy (spec §8.3)."""
    stats = {}
    for n in MEDIAN_WINDOWS:
        value = median_last(test_accuracies, n)
        stats[f"last{n:02d}"] = value
        stats[f"error_last{n:02d}"] = None if value is None else 100.0 - value
    stats["reports"] = len(test_accuracies)
    return stats


def accuracy_stats(history: List[dict]) -> dict:
    """The content of stats/accuracy.json for a report history."""
    stats = median_accuracies([h["test"] for h in history])
    if history:
        stats["kimg"] = history[-1]["kimg"]
        stats["last"] = {k: history[-1][k] for k in ("train_labeled", "valid", "test")}
    return stats


# ---------------------------------------------------------------------------------------------
# Reading

def read_events(folder: str) -> Dict[str, List[tuple]]:
    """{tag: [(step, value), ...]} of the event files in `folder`, in file order."""
    from tensorflow.core.util import event_pb2
    result: Dict[str, List[tuple]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                result.setdefault(value.tag, []).append((event.step, tf.make_ndarray(value.tensor)))
    return result


def read_event_scalars(folder: str, tags: Sequence[str] = TEST_TAGS) -> List[float]:
    """The values of the first tag of `tags` found in the event files of `folder`, by step."""
    return [value for _, value in read_event_series(folder, tags)]


def read_event_series(folder: str, tags: Sequence[str] = TEST_TAGS) -> List[Tuple[int, float]]:
    """(step, value) of the first tag of `tags` found in the event files of `folder`, by step.
    Handles TF2 tensor summaries and TF1 simple_value summaries. A step written twice (a run
    resumed from an earlier checkpoint redoes its reports) keeps the later write."""
    from tensorflow.core.util import event_pb2
    by_tag: Dict[str, Dict[int, Tuple[float, float]]] = {}  # tag -> step -> (wall_time, value)
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        try:
            for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
                event = event_pb2.Event.FromString(record)
                for value in event.summary.value:
                    if value.tag not in tags:
                        continue
                    if value.HasField("simple_value"):
                        number = float(value.simple_value)
                    else:
                        number = float(tf.make_ndarray(value.tensor).reshape(-1)[0])
                    steps = by_tag.setdefault(value.tag, {})
                    steps[int(event.step)] = max(steps.get(int(event.step), (-1.0, 0.0)),
                                                 (event.wall_time, number))
        except tf.errors.DataLossError:
            pass       # a file cut short by an interrupted run: keep what was read
    for tag in tags:
        if tag in by_tag:
            return [(step, value) for step, (_, value) in sorted(by_tag[tag].items())]
    return []


def read_history(run_dir: str) -> List[dict]:
    """stats/accuracy_history.json of a run ([] if there is none)."""
    path = os.path.join(run_dir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable {path} ({e}): delete it, the trainer re-creates it") from None


def run_test_accuracies(run_dir: str, tags: Sequence[str] = TEST_TAGS) -> List[float]:
    """A run's test accuracy at each report, in order: from stats/accuracy_history.json, else
    from its event files (under tf/ or the folder itself, e.g. a released-code run)."""
    history = read_history(run_dir)
    if history:
        return [h["test"] for h in history]
    for folder in (os.path.join(run_dir, "tf"), run_dir):
        values = read_event_scalars(folder, tags)
        if values:
            return values
    return []


def run_stats(run_dir: str, tags: Sequence[str] = TEST_TAGS) -> Optional[dict]:
    """Median-of-last-n test accuracies of one run (`source` says where they came from), or
    None if it has no reports yet: stats/accuracy.json (the trainer's, or the released
    scripts/extract_accuracy.py's), else the event files."""
    path = os.path.join(run_dir, STATS_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                stats = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"unreadable {path} ({e}): delete it, it is re-created from the event "
                            f"files") from None
        if stats.get("last20") is not None:
            return dict(stats, source="stats/accuracy.json")
    for folder in (os.path.join(run_dir, "tf"), run_dir):
        values = read_event_scalars(folder, tags)
        if values:
            return dict(median_accuracies(values), source="events")
    return None
