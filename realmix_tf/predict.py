"""Class predictions for a folder of images with an exported model.

    python -m realmix_tf.predict --model=experiments/cifar10.3@250-5000/RealMix_.../export \\
        --images=DIR --output=predictions.csv

--model: an export folder (model.keras / saved_model / meta.json, written at the end of
training or by `--export_only`), a run folder (its export/ is used), a `.keras` file, or a
SavedModel folder. Images (PNG/JPEG/GIF/BMP, searched recursively, sorted) are converted to
the model's channel count and resized to its image size (bilinear, antialiased) when needed.
The CSV has one row per image: path, class, class_name, confidence, then one probability
column per class (p_<class name>, or p_<index> when the names are unknown).
"""
import csv
import json
import os
import sys

import numpy as np
import tensorflow as tf
from absl import flags

from libml import cli, export
from libml.errors import UserError
from libml.io import atomic_path, check_overwrite

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", "", "Export folder, run folder, .keras file or SavedModel folder.",
                    flag_values=FLAGS)
flags.DEFINE_string("images", "", "Folder of images (searched recursively).", flag_values=FLAGS)
flags.DEFINE_string("output", "predictions.csv", "CSV file to write.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 256, "Images per inference batch.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace an existing --output.", flag_values=FLAGS)


class Predictor:
    """uint8 images [N,H,W,C] -> float32 probabilities [N, nclass], from an export."""

    def __init__(self, path: str):
        path = _resolve_model(path)
        self.path = path
        folder = os.path.dirname(path) if path.endswith(".keras") else os.path.dirname(path.rstrip("/"))
        meta_file = os.path.join(folder, export.META_FILE)
        self.meta = {}
        if os.path.exists(meta_file):
            with open(meta_file) as f:
                self.meta = json.load(f)
        if path.endswith(".keras"):
            self.net = export.load_keras_net(path)
            self._predict = tf.function(
                lambda x: tf.nn.softmax(tf.cast(self.net(export.normalize(x), training=False), tf.float32)))
            shape = self.net.get_build_config()["input_shape"][1:] if not self.meta else None
        else:
            try:
                loaded = tf.saved_model.load(path)
            except (OSError, ValueError, tf.errors.OpError) as e:
                raise UserError(f"cannot load the SavedModel {path} ({str(e).strip().splitlines()[0]}): "
                                f"pass an export folder written by the trainer") from None
            self._loaded = loaded
            serve = loaded.signatures["serving_default"]
            self._predict = lambda x: serve(images=x)["probabilities"]
            shape = serve.structured_input_signature[1]["images"].shape[1:] if not self.meta else None
        if self.meta:
            shape = (self.meta["height"], self.meta["width"], self.meta["channels"])
        self.shape = tuple(int(d) for d in shape)
        self.class_names = list(self.meta.get("class_names", []))

    def __call__(self, images):
        return np.asarray(self._predict(tf.convert_to_tensor(images, tf.uint8)))


def _resolve_model(path: str) -> str:
    if not path:
        raise UserError("no --model given: pass an export folder, e.g. experiments/<dataset>/<run>/export")
    if path.endswith(".keras"):
        if not os.path.isfile(path):
            raise UserError(f"--model={path} not found: pass an existing .keras file")
        return path
    if not os.path.isdir(path):
        raise UserError(f"--model={path} not found: pass an export folder, run folder or .keras file")
    for candidate in (os.path.join(path, "export", export.KERAS_FILE), os.path.join(path, export.KERAS_FILE)):
        if os.path.isfile(candidate):
            return candidate
    for candidate in (os.path.join(path, "export", export.SAVED_MODEL_DIR),
                      os.path.join(path, export.SAVED_MODEL_DIR), path):
        if os.path.isfile(os.path.join(candidate, "saved_model.pb")):
            return candidate
    raise UserError(f"--model={path} holds no model.keras or saved_model: train to the end, or run "
                    f"the training command again with --export_only")


def list_images(folder: str):
    if not folder or not os.path.isdir(folder):
        raise UserError(f"--images={folder!r} is not a folder: pass a folder of PNG/JPEG images")
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise UserError(f"no images in {folder}: it needs files ending in {', '.join(IMAGE_EXTENSIONS)}")
    return sorted(found)


def load_images(paths, shape, batch: int):
    """Yields uint8 batches [B,H,W,C] of the images, converted and resized to `shape`."""
    height, width, channels = shape

    def load(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
        if_resize = tf.logical_or(tf.shape(image)[0] != height, tf.shape(image)[1] != width)
        image = tf.cond(if_resize,
                        lambda: tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
                            image, [height, width], antialias=True)), 0, 255), tf.uint8),
                        lambda: image)
        return tf.ensure_shape(image, shape)

    ds = tf.data.Dataset.from_tensor_slices(list(paths)).map(
        load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch).prefetch(2)
    done = 0
    try:
        for images in ds:
            done += int(images.shape[0])
            yield images
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        bad = _find_bad_image(paths[done:], channels)
        raise UserError(f"cannot read {bad or 'an image'} ({str(e).strip().splitlines()[0][:120]}): "
                        f"remove it or convert it to PNG/JPEG") from None


def _find_bad_image(paths, channels):
    for path in paths:
        try:
            tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
            return path
    return None


def predict_folder(model: str, images: str, output: str, batch: int = 256,
                   overwrite: bool = False) -> int:
    """Writes the predictions CSV; returns the number of images."""
    if batch < 1:
        raise UserError(f"--batch={batch} must be positive: pass a batch size >= 1")
    _resolve_model(model)
    paths = list_images(images)
    check_overwrite(output, overwrite)    # before the (possibly long) inference
    predictor = Predictor(model)
    probs = np.concatenate([predictor(x) for x in load_images(paths, predictor.shape, batch)])
    names = predictor.class_names
    columns = [f"p_{names[i]}" if i < len(names) else f"p_{i}" for i in range(probs.shape[1])]
    with atomic_path(output, overwrite) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "class", "class_name", "confidence"] + columns)
            for path, p in zip(paths, probs):
                k = int(np.argmax(p))
                writer.writerow([os.path.relpath(path, images), k, names[k] if k < len(names) else "",
                                 f"{p[k]:.6f}"] + [f"{v:.6f}" for v in p])
    return len(paths)


def main(argv=None):
    rest = cli.parse(FLAGS, argv)
    if rest:
        raise UserError(f"unexpected arguments {' '.join(rest)}: use --model, --images, --output")
    count = predict_folder(FLAGS.model, FLAGS.images, FLAGS.output, FLAGS.batch, FLAGS.overwrite)
    print(f"wrote {count} predictions to {FLAGS.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
