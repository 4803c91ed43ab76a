"""The trainer's two other modes: --eval_ckpt (evaluate a checkpoint as it is) and
--export_only (export the newest checkpoint of the run). Each takes a built
libml.train.trainer.Trainer (its model, evaluation sets and run folder)."""
import os

from libml.run.checkpoints import latest_checkpoint, read_model, resolve_checkpoint
from libml.train.config import KIMG
from libml.base.errors import UserError
from libml.export import ood_reference
from libml.export.saving import export_model, export_note, join_export
from libml.base.files import write_json
from libml.run.relaunch import RunLock
from libml.base.storage import disk_errors
from libml.run.summaries import finite_or_none


def evaluate_checkpoint(trainer, path: str) -> dict:
    """--eval_ckpt: raw and EMA accuracy on valid and test, printed and written to JSON
    (`{run}/stats/eval-{checkpoint}.json` beside the checkpoint's run)."""
    prefix = resolve_checkpoint(path)
    read_model(trainer.model, prefix)
    step = int(trainer.model.step.numpy())
    result = dict(checkpoint=prefix, step=step, kimg=step / KIMG)
    for ema, label in ((False, "raw"), (True, "ema")):
        accuracy, _ = trainer.evaluate(ema=ema, sets=("valid", "test"))
        result[label] = {k: finite_or_none(v) for k, v in accuracy.items()}
    print(f"{'':8s} {'valid':>8s} {'test':>8s}")
    for label in ("raw", "ema"):
        r = result[label]
        print(f"{label:8s} {_pct(r['valid']):>8s} {_pct(r['test']):>8s}")
    run_dir = os.path.dirname(os.path.dirname(prefix))
    out = os.path.join(run_dir, "stats", f"eval-{os.path.basename(prefix)}.json")
    if trainer.role.is_chief:
        write_json(out, result, overwrite=True)
    print(f"wrote {out}")
    result["output"] = out
    return result


def export_latest(trainer) -> dict:
    """--export_only: exports the newest checkpoint of the run (holding the run's lock)."""
    prefix = latest_checkpoint(trainer.tf_dir)
    if not prefix:
        raise UserError(f"{trainer.run_dir} has no complete checkpoint to export: train first "
                        f"(the same command without --export_only)")
    if not trainer.role.is_chief:         # the reads (collectives) only, nothing written
        read_model(trainer.model, prefix)
        ood_reference_of(trainer)
        join_export(trainer.model, trainer.info)
        return {}
    with RunLock(trainer.run_dir):
        read_model(trainer.model, prefix)
        ood = ood_reference_of(trainer)
        with disk_errors(trainer.export_dir, what="the export"):
            paths = export_model(trainer.model, trainer.info, trainer.export_dir,
                                 export_meta(trainer), ood)
    print(f"exported {prefix}\n{export_note(paths)}")
    return paths


def ood_reference_of(trainer, min_valid: int = ood_reference.MIN_VALID) -> dict:
    """The export's OOD reference (libml/export/ood_reference.py) from the EMA model's features
    of the labeled and the validation images, evaluated under the run's strategy (every
    worker calls it: the gathers are collectives)."""
    sets = ("train_labeled", "valid")
    _, kept = trainer.evaluate(ema=True, sets=sets, keep=sets)
    labeled, valid = kept["train_labeled"], kept["valid"]
    return ood_reference.build(labeled["features"], labeled["labels"], valid["features"],
                               valid["labels"], trainer.info.nclass, min_valid=min_valid)


def export_meta(trainer) -> dict:
    """meta.json's run fields of an export."""
    return dict(dataset=trainer.config.dataset, algorithm=trainer.algorithm,
                step=int(trainer.model.step.numpy()), hparams=trainer.hparams)


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
