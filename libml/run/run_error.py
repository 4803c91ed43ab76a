"""THE test error of a run, one number named one way everywhere (TensorFlow-free).

    test error = 100 - the median test accuracy of the EMA model over the run's last N reports

N is the trainer's --median_last: 20 by default, the libml / paper protocol (the paper: the
last 20 of 512 reports; runs/extract_accuracy.py). Short runs pass the last quarter of their
reports instead (the quickstart: 8 of 32, runs.miniature: 4 of 16), so that the window does
not reach back into the ramp-up while the model is still improving fast. The trainer's last
line, the quickstart's table, runs.miniature's tables and the README all print
`name(n)` beside this number; the other windows (stats/accuracy.json: last 1/10/20/50, and the
final report) only where asked for.
"""
import math
from typing import Optional, Sequence

DEFAULT_LAST = 20


def median_last(test_accuracies: Sequence[Optional[float]], n: int) -> Optional[float]:
    """Median of the finite values among the last n (None if there is none): THE median of the
    last n reports used by the trainer, extract_accuracy, quickstart and miniature."""
    window = sorted(a for a in list(test_accuracies)[-n:] if a is not None and math.isfinite(a))
    if not window:
        return None
    middle = len(window) // 2
    return float(window[middle]) if len(window) % 2 else (window[middle - 1] + window[middle]) / 2.0


def error_of(test_accuracies: Sequence[Optional[float]], n: int = DEFAULT_LAST) -> Optional[float]:
    """100 - median_last(test_accuracies, n), or None without a finite report."""
    median = median_last(test_accuracies, n)
    return None if median is None else 100.0 - median


def window(n: int, reports: Optional[int] = None) -> str:
    """'median of the last 8 reports'; for a run with fewer reports 'median of all 5 reports';
    'the last report' for n = 1."""
    if reports is not None and reports < n:
        return "the only report" if reports == 1 else f"median of all {reports} reports"
    return "the last report" if n == 1 else f"median of the last {n} reports"


def name(n: int, reports: Optional[int] = None) -> str:
    """A table column's name: 'test error % (median of the last 8 reports)'."""
    return f"test error % ({window(n, reports)})"


def line(error: Optional[float], n: int, reports: Optional[int] = None) -> str:
    """A console line's words: 'test error 2.90 % (median of the last 8 reports)'."""
    value = "n/a" if error is None else f"{error:.2f}"
    return f"test error {value} % ({window(n, reports)})"
