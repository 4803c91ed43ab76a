"""Class predictions for image files with an exported model.

    python -m realmix_tf.predict --model=experiments/cifar10.3@250-5000/RealMix_.../export \\
        photos/ more/*.jpg one.png --output=predictions.csv

--model: an export folder (model.keras / saved_model / meta.json, written at the end of
training or by `--export_only`), a run folder (its export/ is used), a `.keras` file, or a
SavedModel folder. Images: files, folders (searched recursively) and shell patterns, as
arguments or with --images (repeatable). They are read exactly as `create_datasets custom`
read the training images (libml/data/images.py: EXIF rotation, 8-bit, shorter side resized to the
model's size with bicubic resampling, centre crop, the model's channel count), so the model
sees what training saw. Unreadable files stop the command with one line naming them, or are
left out and listed with --skip_bad_images. The CSV has one row per image: path (relative to
its folder, or as given), class, class_name, confidence, then one probability column per class
(p_<class name>, or p_<index> when the names are unknown), then "none of these classes":
ood_score (cosine distance of the image's features to the nearest class prototype, higher =
more outlying) and ood (out: above the export's threshold, the score below which 95 % of the
labeled validation images fall; libml/export/ood_reference.py). An export without the
reference (older ones, a SavedModel alone) gives no such columns, said in one info line.
"""
import csv
import os
import sys

import numpy as np
from absl import flags

from libml.base import cli

from libml.export import ood_reference, saving
from libml.data import images

from libml.export import saved_model_check
from libml.base.errors import UserError, first_line
from libml.base.files import atomic_path, check_overwrite, progress, read_json, text_cell

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", "", "Export folder, run folder, .keras file or SavedModel folder.",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("images", [], "Image file, folder (searched recursively) or pattern; "
                          "repeatable; positional arguments are added.", flag_values=FLAGS)
flags.DEFINE_string("output", "predictions.csv", "CSV file to write.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 256, "Images per inference batch.", flag_values=FLAGS)
flags.DEFINE_integer("workers", 0, "Image decoding threads (0 = number of CPUs).", flag_values=FLAGS)
flags.DEFINE_bool("skip_bad_images", False, "Leave unreadable images out (listed on the console) "
                  "instead of stopping.", flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace an existing --output.", flag_values=FLAGS)
flags.DEFINE_float("max_megapixels", images.MAX_MEGAPIXELS, "Largest image read, in megapixels "
                   "(checked before decoding: memory and time grow with the pixel count); larger "
                   "ones are unreadable files.", flag_values=FLAGS)


class Predictor:
    """uint8 images [N,H,W,C] -> float32 probabilities [N, nclass], from an saving.

    A `.keras` file is loaded in Keras safe mode (no Lambda layers, no TFSMLayer, no code of
    the file's); a SavedModel only after libml/export/saved_model_check.py found nothing in it but
    what the export writes. meta.json, when present, must be well formed and agree with the
    model (image shape, class count)."""

    def __init__(self, path: str):
        path = _resolve_model(path)
        self.path = path
        folder = os.path.dirname(path) if path.endswith(".keras") else os.path.dirname(path.rstrip("/"))
        self.meta = read_meta(os.path.join(folder, saving.META_FILE))
        meta_shape = (self.meta["height"], self.meta["width"], self.meta["channels"]) if self.meta else None
        meta_nclass = self.meta.get("nclass") if self.meta else None
        if path.endswith(".keras"):
            self._outputs, shape, nclass = saving.load_classifier(path, features=True)
            self.ood = ood_reference.read(folder, nclass)
            self.ood_note = self.ood.describe() if self.ood else (
                f"info: {folder} has no {ood_reference.FILE} (an export written before it): no "
                f"ood_score/ood columns; re-export the run with --export_only to add them")
        else:
            shape, nclass = saved_model_check.check(path)     # meta.json compared below
            serve = _load_saved_model(path)
            self._outputs = lambda x: (serve(x), None)
            self.ood = None
            self.ood_note = (f"info: a SavedModel gives no features: no ood_score/ood columns; "
                             f"pass the export folder (its {saving.KERAS_FILE}) to get them")
        self.shape = tuple(int(d) if d is not None else None for d in shape)
        if meta_shape is not None and self.shape != meta_shape or (
                meta_nclass is not None and nclass is not None and int(nclass) != meta_nclass):
            raise UserError(f"{path} takes {_shape_text(self.shape)} images and gives {nclass} "
                            f"classes, but {os.path.join(folder, saving.META_FILE)} says "
                            f"{_shape_text(meta_shape)} and {meta_nclass}: the two come from "
                            f"different exports; re-export the run with --export_only")
        if None in self.shape or self.shape[0] != self.shape[1]:
            raise UserError(f"{path} expects {_shape_text(self.shape)} images; only square "
                            f"models (as create_datasets writes them) are supported")
        self.class_names = list(self.meta.get("class_names", []))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.outputs(batch)[0]

    def outputs(self, batch: np.ndarray):
        """(probabilities [N, nclass], ood scores [N] or None without a reference), one pass."""
        probs, features = self._outputs(batch)
        scores = None if self.ood is None else self.ood.score(np.asarray(features))
        return np.asarray(probs, np.float32), scores


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "?"


def _load_saved_model(path: str):
    import tensorflow as tf
    try:
        loaded = tf.saved_model.load(path)
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise UserError(f"cannot load the SavedModel {path} ({first_line(e)}): "
                        f"pass an export folder written by the trainer") from None
    serve = loaded.signatures["serving_default"]
    return lambda x: serve(images=tf.convert_to_tensor(x, tf.uint8))["probabilities"]


def read_meta(path: str) -> dict:
    """meta.json of an export ({} when absent); a malformed one is one line."""
    if not os.path.exists(path):
        return {}
    fix = "re-export the run with --export_only (or remove the file to predict without class names)"
    meta = read_json(path, fix)
    problem = None
    if not isinstance(meta, dict):
        problem = f"it holds a {type(meta).__name__}, not an object"
    else:
        missing = [k for k in ("height", "width", "channels") if k not in meta]
        if missing:
            problem = f"no {missing[0]}"
        elif not all(_positive_int(meta[k]) for k in ("height", "width", "channels")):
            problem = "height, width and channels are not positive integers"
        elif "nclass" in meta and not _positive_int(meta["nclass"]):
            problem = f"nclass {meta['nclass']!r} is not a positive integer"
        elif not isinstance(meta.get("class_names", []), list) or not all(
                isinstance(n, str) for n in meta.get("class_names", [])):
            problem = "class_names is not a list of names"
        elif "nclass" in meta and meta.get("class_names") and len(meta["class_names"]) != meta["nclass"]:
            problem = f"{len(meta['class_names'])} class_names for nclass {meta['nclass']}"
    if problem:
        raise UserError(f"malformed {path} ({problem}): {fix}")
    return meta


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 20


def _resolve_model(path: str) -> str:
    if not path:
        raise UserError("no --model given: pass an export folder, e.g. experiments/<dataset>/<run>/export")
    if path.endswith(".keras"):
        if not os.path.isfile(path):
            raise UserError(f"--model={path} not found: pass an existing .keras file")
        return path
    if not os.path.isdir(path):
        raise UserError(f"--model={path} not found: pass an export folder, run folder or .keras file")
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), saving.KERAS_FILE)
    for candidate in (os.path.join(path, "export", saving.KERAS_FILE), os.path.join(path, saving.KERAS_FILE)):
        if os.path.isfile(candidate):
            return candidate
    if os.path.isfile(os.path.join(path, "saved_model.pb")) and os.path.isfile(beside):
        return beside       # a SavedModel of an export: its model.keras loads in safe mode
    for candidate in (os.path.join(path, "export", saving.SAVED_MODEL_DIR),
                      os.path.join(path, saving.SAVED_MODEL_DIR), path):
        if os.path.isfile(os.path.join(candidate, "saved_model.pb")):
            return candidate
    raise UserError(f"--model={path} holds no model.keras or saved_model: train to the end, or run "
                    f"the training command again with --export_only")


def predict_files(model: str, specs, output: str, batch: int = 256, overwrite: bool = False,
                  skip_bad: bool = False, workers: int = 0, show_progress: bool = True,
                  max_megapixels: float = images.MAX_MEGAPIXELS):
    """Writes the predictions CSV; returns the ReadSummary (read, skipped and why)."""
    if batch < 1:
        raise UserError(f"--batch={batch} must be positive: pass a batch size >= 1")
    if workers < 0:
        raise UserError(f"--workers={workers} is negative: pass 0 (all CPUs) or more")
    images.check_megapixels(max_megapixels)
    _resolve_model(model)
    summary = images.ReadSummary()
    found = images.find_images(specs, summary)
    if os.path.isdir(output):
        raise UserError(f"--output={output} is a folder: pass a file name, e.g. "
                        f"--output={os.path.join(output, 'predictions.csv')}")
    check_overwrite(output, overwrite)    # before the (possibly long) inference
    predictor = Predictor(model)
    size, _, channels = predictor.shape
    rows, probs, scores = [], [], []
    print(predictor.ood_note, file=sys.stderr)
    bar = progress(desc="predicting" if show_progress else None, total=len(found))
    try:
        for start in range(0, len(found), batch):
            chunk = found[start:start + batch]
            arrays, kept, _ = images.load_images([p for p, _ in chunk], size, channels, skip_bad,
                                                 workers, summary=summary,
                                                 max_megapixels=max_megapixels)
            if arrays:
                p, s = predictor.outputs(np.stack(arrays))
                probs.append(p)
                scores.append(s)
                rows += [chunk[i][1] for i in kept]
            if bar is not None:
                bar.update(len(chunk))
    finally:        # the bar's line ends before any error line
        if bar is not None:
            bar.close()
    for line in summary.lines():
        print(line, file=sys.stderr)
    if not rows:
        raise UserError("no image could be read: see the list above; fix or convert the files")
    ood = None if predictor.ood is None else (np.concatenate(scores), predictor.ood)
    _write_csv(output, rows, np.concatenate(probs), predictor.class_names, overwrite, ood)
    if ood is not None:
        print(f"ood: {int(np.sum(ood[0] > ood[1].threshold))} of {len(rows)} images above the "
              f"threshold (ood = out)", file=sys.stderr)
    return summary


def _write_csv(output, names, probs, class_names, overwrite, ood=None):
    """ood: (scores [N], the ood_reference.Reference) adds the ood_score and ood columns."""
    columns = [f"p_{class_names[i]}" if i < len(class_names) else f"p_{i}" for i in range(probs.shape[1])]
    class_names = [text_cell(n) for n in class_names]
    names = [text_cell(n) for n in names]
    extra = [[] for _ in names] if ood is None else [[f"{s:.6f}", flag] for s, flag in
                                                      zip(ood[0], ood[1].flags(ood[0]))]
    with atomic_path(output, overwrite) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "class", "class_name", "confidence"] + columns
                            + ([] if ood is None else ["ood_score", "ood"]))
            for name, p, more in zip(names, probs, extra):
                k = int(np.argmax(p))
                writer.writerow([name, k, class_names[k] if k < len(class_names) else "",
                                 f"{p[k]:.6f}"] + [f"{v:.6f}" for v in p] + more)


def main(argv=None):
    rest = cli.parse(FLAGS, argv)
    specs = list(FLAGS.images) + list(rest)
    summary = predict_files(FLAGS.model, specs, FLAGS.output, FLAGS.batch, FLAGS.overwrite,
                            FLAGS.skip_bad_images, FLAGS.workers, FLAGS.progress,
                            FLAGS.max_megapixels)
    print(f"wrote {summary.read} predictions to {FLAGS.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
