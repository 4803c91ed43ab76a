"""The trainer's reports (spec §7): at each --report_kimg, one evaluation of the EMA model on
train_labeled / valid / test, its TensorBoard scalars and the period's step means, the
history (stats/accuracy_history.json) and its medians (stats/accuracy.json), the console
line, and the algorithm's own report hooks (RealMix's --gamma=auto). Only the chief writes.
"""
import os
from typing import List

from libml.train.config import KIMG
from libml.base.files import write_json
from libml.run.summaries import (HISTORY_FILE, STATS_FILE, accuracy_stats, finite_or_none,
                             read_history, write_histogram, write_scalar)


class Reports:
    """The reports of one trainer (libml.train.trainer.Trainer). Hooks, from the model's
    `report_hooks`: load_history(step) when a run resumes; report(trainer, step, kept,
    accuracy) -> a line to print (or None), inside the TensorBoard writer's context."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.history: List[dict] = []
        self.hooks = trainer.model.report_hooks(trainer.run_dir, writes=trainer.role.is_chief)

    def load_history(self, step: int) -> None:
        """Report history up to the restored step (reports after it will be redone)."""
        self.history = [h for h in read_history(self.trainer.run_dir) if h["step"] <= step]
        for hook in self.hooks:
            hook.load_history(step)

    def report(self, writer, step: int, means: dict) -> None:
        t = self.trainer
        accuracy, kept = t.evaluate(ema=True, keep=("valid", "train_labeled"))
        confidence = kept["valid"]["probs"].max(axis=1) if len(kept["valid"]["probs"]) else None
        kimg = step / KIMG
        with writer.as_default(step=step):
            write_scalar("accuracy/train_labeled", accuracy["train_labeled"])
            write_scalar("accuracy/valid", accuracy["valid"])
            write_scalar("accuracy", accuracy["test"])
            for key, value in means.items():
                write_scalar(key, value)
            write_scalar("monitors/lr", t.config.lr)
            write_scalar("monitors/kimg", kimg)
            if confidence is not None:
                write_histogram("monitors/unlabeled_confidence", confidence)
            lines = [hook.report(t, step, kept, accuracy) for hook in self.hooks]
        writer.flush()
        self.history = [h for h in self.history if h["step"] < step]
        self.history.append(dict(step=step, kimg=kimg,
                                 **{k: finite_or_none(v) for k, v in accuracy.items()}))
        if not t.role.is_chief:
            return
        write_json(os.path.join(t.run_dir, HISTORY_FILE), self.history, overwrite=True)
        write_json(os.path.join(t.run_dir, STATS_FILE), accuracy_stats(self.history),
                   overwrite=True)
        t.bar.write(f"kimg {kimg:<8g} accuracy train/valid/test  {accuracy['train_labeled']:.2f}  "
                    f"{accuracy['valid']:.2f}  {accuracy['test']:.2f}   "
                    f"{means.get('monitors/img_per_sec', 0):.0f} img/s")
        t.bar.report(step, accuracy["test"])
        for line in filter(None, lines):
            t.bar.write(line)
