"""What a training run shows on the console: the start banner and one whole-run progress bar.

Banner (stderr, once, before the first step):

    RealMix  experiments/cifar10.3@250-5000/RealMix_archresnet_batch64_...
      data      cifar10.3@250-5000: 250 labeled, 44,750 unlabeled, 5,000 valid, 10,000 test (32x32x3, 10 classes)
      model     Wide ResNet filters 32 repeat 4 scales 3: 1.47 M parameters
      device    1 x CPU (default strategy)
      precision mixed_bfloat16 (--mixed_precision=auto: ...); oneDNN on; Intel(R) Xeon(R) ..., 2 cores, AVX2 yes | ...
      start     fresh start (0 kimg), run length 65536 kimg   |   resuming from tf/model.ckpt-65536 (64 kimg), ...

Progress: one tqdm bar over the whole run (libml's epoch counter showed the run's position),
starting at the resumed position, with the time left at the current speed, the report number
and the last test accuracy; report lines go above it.
"""
import sys
from typing import Dict, List, Optional, Sequence

KIMG = 1024


def plural(n: int, word: str, words: str = "") -> str:
    """1, 'curve' -> '1 curve'; 2, 'curve' -> '2 curves' (`words`: an irregular plural)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def human(n: float) -> str:
    """1234 -> '1,234'; 1.47e6 -> '1.47 M'."""
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    return f"{int(n):,}"


def count_parameters(net) -> int:
    """Trainable and non-trainable weights of a Keras model (BN statistics included)."""
    import numpy as np
    return int(sum(np.prod(v.shape) for v in net.weights))


def describe_strategy(strategy) -> str:
    """'2 x CPU (MirroredStrategy)' from a tf.distribute strategy."""
    try:
        devices = list(strategy.extended.worker_devices)
    except (RuntimeError, AttributeError):      # the default strategy has no device list
        import tensorflow as tf
        devices = ["device:GPU:0"] if tf.config.list_logical_devices("GPU") else ["device:CPU:0"]
    kinds = sorted({d.split("device:")[-1].split(":")[0] for d in devices})
    name = type(strategy).__name__
    name = "default strategy" if name in ("_DefaultDistributionStrategy", "DefaultDistributionStrategy") else name
    return f"{strategy.num_replicas_in_sync} x {'/'.join(kinds)} ({name})"


def banner(algorithm: str, run_dir: str, dataset: str, sizes: Dict[str, Optional[int]],
           shape: Sequence[int], nclass: int, architecture: str, parameters: int,
           device: str, setup: str, resumed: str, step: int, train_nimg: int) -> List[str]:
    """The banner lines (see the module docstring). `sizes`: labeled/unlabeled/valid/test image
    counts (None = not counted: a streamed set too large to count at start); `setup`: the
    trainer's "precision ... ; oneDNN ...; CPU ..." line (Trainer.start_line)."""
    counted = ", ".join(f"{'?' if n is None else human(n)} {k}" for k, n in sizes.items())
    where = f"({step / KIMG:g} kimg), run length {train_nimg / KIMG:g} kimg"
    return [
        f"{algorithm}  {run_dir}",
        f"  data      {dataset}: {counted} ({'x'.join(str(int(d)) for d in shape)}, {nclass} classes)",
        f"  model     {architecture}: {human(parameters)} parameters",
        f"  device    {device}",
        f"  {setup}",
        f"  start     {resumed} {where}",
    ]


class RunProgress:
    """A progress bar over the whole run, in images; disabled when `enabled` is False (then
    `write` prints plainly). Use as a context manager or call close()."""

    def __init__(self, step: int, train_nimg: int, report_nimg: int, enabled: bool = True,
                 desc: str = "run"):
        self.report_nimg = max(int(report_nimg), 1)
        self.reports = -(-int(train_nimg) // self.report_nimg)
        self.bar = None
        if enabled and step < train_nimg:
            from tqdm import tqdm
            self.bar = tqdm(total=int(train_nimg), initial=int(step), desc=desc, unit="img",
                            unit_scale=True, dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} img "
                                       "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")
            self._postfix(step, None)

    def _postfix(self, step: int, test_accuracy: Optional[float]) -> None:
        text = f"report {min(step // self.report_nimg + 1, self.reports)}/{self.reports}"
        if test_accuracy is not None:
            text += f", test {test_accuracy:.2f} %"
        self.bar.set_postfix_str(text, refresh=False)

    def update(self, images: int) -> None:
        if self.bar is not None:
            self.bar.update(images)

    def report(self, step: int, test_accuracy: Optional[float]) -> None:
        """After a report: the next report number and the test accuracy just measured."""
        if self.bar is not None:
            self._postfix(step, test_accuracy)
            self.bar.refresh()

    def write(self, line: str) -> None:
        """A console line (stderr) above the bar, or plainly without a bar."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
