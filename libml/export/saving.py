"""Export of the EMA model, loading it back, and transfer learning (spec §7.4).

An export folder (`{run}/export/` by default) holds:
    model.keras      the EMA Wide ResNet (EMA weights + live BN statistics) rebuilt from standard
                     Keras layers (libml/export/plain_keras.py): `keras.models.load_model` loads it in
                     any Python with Keras 3, nothing of this project needed. Input "images"
                     float32 [N,H,W,C] with pixel values 0..255 (the x*2/255-1 scaling is its
                     first layer); output "probabilities" [N, nclass]
    saved_model/     TF SavedModel of the same model for TF Serving: signature
                     `serving_default(images: uint8 [N,H,W,C])` -> {probabilities, class,
                     confidence}; needs no Python code to serve
    meta.json        dataset, image shape, class names, training step, hyper-parameters
    ood_reference.npz  class prototypes of the EMA features and the OOD threshold calibrated on
                     the labeled validation images (libml/export/ood_reference.py): predict's
                     ood_score and ood columns; absent from older exports
Both expect images prepared as training prepared them (libml/data/images.py: EXIF rotation, 8-bit,
shorter side resized to H with bicubic resampling, centre crop); `realmix_tf.predict` does that.
Exports written before the plain-Keras model (a `WideResNet` in model.keras, input in [-1, 1],
output logits) still load here.
"""
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from libml.export import ood_reference, plain_keras
from libml.run.checkpoints import checkpoint_key, resolve_checkpoint
from libml.base.errors import UserError, first_line
from libml.base.files import write_json
from libml.nn.wrn import WideResNet

KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
META_FILE = "meta.json"

# WideResNet has get_config; registering it makes `.keras` files loadable by name.
keras.saving.register_keras_serializable(package="libml")(WideResNet)


def normalize(images):
    """uint8 [0, 255] -> float32 [-1, 1], as in training."""
    return tf.cast(images, tf.float32) * (2.0 / 255) - 1.0


class ServingModule(tf.Module):
    """Wraps the plain inference model for the SavedModel: uint8 images in, probabilities out."""

    def __init__(self, net, image_shape):
        super().__init__()
        self.net = net
        self.net_variables = list(net.weights)   # tracked explicitly for the SavedModel
        self.serve = tf.function(
            self._serve, input_signature=[tf.TensorSpec([None, *image_shape], tf.uint8, name="images")])

    def _serve(self, images):
        probs = tf.cast(self.net(tf.cast(images, tf.float32), training=False), tf.float32)
        return {"probabilities": probs, "class": tf.argmax(probs, axis=-1),
                "confidence": tf.reduce_max(probs, axis=-1)}


def export_model(model, info, out_dir: str, meta: dict = None, ood: dict = None) -> dict:
    """Writes the EMA net of `model` (an SSLModel) to `out_dir` (replaced as a whole: the new
    export is written beside it and renamed in place when complete), with the OOD reference
    `ood` (ood_reference.build's arrays) when given. Returns the paths."""
    out_dir = os.path.abspath(out_dir)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        net = plain_keras.build(model.ema_net, info.shape)
        net.save(os.path.join(tmp, KERAS_FILE))
        serving = ServingModule(net, info.shape)
        tf.saved_model.save(serving, os.path.join(tmp, SAVED_MODEL_DIR),
                            signatures={"serving_default": serving.serve})
        description = dict(meta or {}, nclass=info.nclass, height=info.height, width=info.width,
                           channels=info.channels, class_names=list(info.class_names),
                           input="images [N,H,W,C], pixel values 0..255 (uint8 for saved_model), "
                                 "prepared as libml/data/images.py does; output probabilities")
        write_json(os.path.join(tmp, META_FILE), description)
        if ood is not None:
            ood_reference.write(os.path.join(tmp, ood_reference.FILE), ood)
        old = f"{out_dir}.old-{os.getpid()}"
        if os.path.exists(out_dir):
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"keras": os.path.join(out_dir, KERAS_FILE),
            "saved_model": os.path.join(out_dir, SAVED_MODEL_DIR),
            "meta": os.path.join(out_dir, META_FILE)}


def export_note(paths: dict) -> str:
    """The line that tells where an export went and how to use it (`paths`: export_model's)."""
    folder = os.path.dirname(paths["keras"])
    return (f"  export    {_shown(paths['keras'])} (plain Keras), {_shown(paths['saved_model'])} "
            f"(SavedModel); predict with: python -m realmix_tf.predict --model={_shown(folder)} "
            f"IMAGES")


def _shown(path: str) -> str:
    """`path` relative to the working folder when it lies under it, else absolute."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def join_export(model, info) -> None:
    """A non-chief worker's part of `export_model` under MultiWorkerMirroredStrategy: reading
    the EMA net's weights (the sync-on-read BatchNorm statistics are a collective every worker
    joins); nothing is written."""
    plain_keras.build(model.ema_net, info.shape)


def load_keras(path: str):
    """The model in a .keras file: a plain-Keras export or an older WideResNet export."""
    try:
        net = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # keras raises many types for a bad file
        raise UserError(f"cannot load {path} ({type(e).__name__}: {first_line(e)}): pass a "
                        f".keras file written by the trainer's export") from None
    if not isinstance(net, WideResNet) and plain_keras.LOGITS_NAME not in [l.name for l in net.layers]:
        raise UserError(f"{path} holds a {type(net).__name__} without a {plain_keras.LOGITS_NAME} "
                        f"layer, not an export of this trainer: pass a .keras file written by it")
    return net


def load_keras_net(path: str):
    """A .keras export as a net in the trainer's convention (input in [-1, 1], output logits,
    `.nclass`): the WideResNet of an older export, or the plain model wrapped."""
    net = load_keras(path)
    return net if isinstance(net, WideResNet) else plain_keras.LogitsNet(net)


def load_classifier(path: str, features: bool = False):
    """(uint8 images [N,H,W,C] -> float32 probabilities, image shape, nclass) of a .keras
    export, loaded in Keras safe mode (keras' default: no Lambda layer, no TFSMLayer). With
    `features`, the function returns (probabilities, pooled features [N, D]) of one pass."""
    net = load_keras(path)
    if isinstance(net, WideResNet):
        def both(x):
            pooled, logits = net.features_and_logits(normalize(x), training=False)
            return tf.nn.softmax(tf.cast(logits, tf.float32)), tf.cast(pooled, tf.float32)
        fn = tf.function(both if features else lambda x: both(x)[0])
        return fn, tuple(net.get_build_config()["input_shape"][1:]), net.nclass
    shapes = [tuple(net.input_shape[1:]) if len(net.input_shape) == 4 else None,
              tuple(net.output_shape) if isinstance(net.output_shape, tuple) else None]
    if shapes[0] is None or shapes[1] is None or len(shapes[1]) != 2:
        raise UserError(f"{path} takes {net.input_shape} and gives {net.output_shape}, not images "
                        f"[N,H,W,C] -> probabilities [N, nclass]: pass a .keras file written by "
                        f"the trainer's export")
    if features:
        net = keras.Model(net.input, [net.output, net.get_layer(plain_keras.LOGITS_NAME).input])
        fn = tf.function(lambda x: [tf.cast(t, tf.float32) for t in net(tf.cast(x, tf.float32), training=False)])
    else:
        fn = tf.function(lambda x: tf.cast(net(tf.cast(x, tf.float32), training=False), tf.float32))
    return fn, shapes[0], shapes[1][1]


# ---------------------------------------------------------------------------------------------
# Transfer learning

def transfer_weights(model, source: str, info) -> str:
    """Initialises `model.net` and `model.ema_net` from `source` (a run folder, its tf/ folder,
    a checkpoint prefix, or an exported .keras file) except the classifier head, which keeps
    its fresh initialisation; the optimizer and the step stay fresh (spec §7.4).
    A different architecture (filters, repeat, scales, channels) is a UserError."""
    targets = [model.net, model.ema_net]
    if source.endswith(".keras"):
        src = load_keras(source)
        if not isinstance(src, WideResNet):
            _copy_from_plain(targets, src, source)
            return source
        pairs = [(t, src) for t in targets]
    else:
        prefix = resolve_checkpoint(source)
        src_net, src_ema = _restore_source_nets(model.net, prefix, info)
        pairs = [(model.net, src_net), (model.ema_net, src_ema)]
    for target, src in pairs:
        _copy_except_head(target, src, source)
    return source


def _restore_source_nets(net, prefix: str, info):
    """Builds nets like `net` (same layer names) with the source's class count and restores
    them from the checkpoint, matching variables by path."""
    shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    head_bias = checkpoint_key(f"net/{net.classifier.name}/bias")
    if head_bias not in shapes:
        raise UserError(f"{prefix} is not a checkpoint of this trainer (no {head_bias}): pass a "
                        f"run folder or checkpoint written by realmix_tf")
    src_nclass = int(shapes[head_bias][0])
    nets = [WideResNet(src_nclass, filters=net.filters, repeat=net.repeat, scales=net.scales,
                       name=name).build_for(info.shape) for name in ("net", "ema_net")]
    variables = {v.path: v for src in nets for v in src.weights}
    for path, v in variables.items():
        shape = shapes.get(checkpoint_key(path))
        if shape is None or tuple(shape) != tuple(v.shape):
            have = "no such variable" if shape is None else f"shape {tuple(shape)}"
            raise UserError(f"{prefix} has a different architecture ({path}: {have}, this model "
                            f"needs {tuple(v.shape)}): use the source run's "
                            f"--filters/--repeat/--scales and an image size like its own")
    prefix_paths = {checkpoint_key(p).split("/")[1].split(".S")[0] for p in variables}
    stored = {k for k in shapes if k.startswith("variables/") and k.split("/")[1].split(".S")[0] in prefix_paths}
    if len(stored) != len(variables):
        raise UserError(f"{prefix} has a different architecture ({len(stored)} network variables, "
                        f"this model has {len(variables)}): use the source run's "
                        f"--filters/--repeat/--scales")
    tf.train.Checkpoint(variables=variables).read(prefix).expect_partial()
    return nets


def _copy_from_plain(targets, plain, source: str) -> None:
    try:
        updates = [pair for t in targets
                   for pair in plain_keras.weights_for(t, plain, skip=(plain_keras.LOGITS_NAME,))]
    except (KeyError, ValueError) as e:
        raise UserError(f"{source} has a different architecture ({e.args[0] if e.args else e}): "
                        f"use the source run's --filters/--repeat/--scales and channel count") from None
    for variable, array in updates:
        variable.assign(array)


def _copy_except_head(target, src, source: str) -> None:
    head = {id(v) for v in target.classifier.weights}
    src_head = {id(v) for v in src.classifier.weights}
    if len(target.weights) != len(src.weights):
        raise UserError(f"{source} has a different architecture ({len(src.weights)} variables, "
                        f"this model has {len(target.weights)}): use the source run's "
                        f"--filters/--repeat/--scales")
    updates = []
    for t, s in zip(target.weights, src.weights):
        if id(t) in head:
            continue
        if id(s) in src_head or tuple(t.shape) != tuple(s.shape):
            raise UserError(f"{source} has a different architecture ({t.path} is {tuple(t.shape)}, "
                            f"the source's {s.path} is {tuple(s.shape)}): use the source run's "
                            f"--filters/--repeat/--scales and channel count")
        updates.append((t, s))
    for t, s in updates:
        t.assign(np.asarray(s.numpy()))
