"""The original libml / RealMix command-line flags, accepted by every trainer here.

A command line written for MixMatch's or RealMix's libml runs unchanged: each of their flags
that this project does not define under the same name is defined here, then
- mapped, when it has a meaning here (MAPPED: how, in `resolve`);
- checked, when only one value makes sense here (--arch=resnet, --nu=2);
- announced once, in one `note:` line, when it has no effect here (NO_EFFECT: why).
Flags this project already defines (dataset, batch, lr, wd, ema, filters, ...), RealMix's
--percent_mask (an alias of --gamma) and Mean Teacher's --smoothing (its own module) are not
repeated here.
"""
from typing import Dict, List, Tuple

from absl import flags

from libml.base.errors import UserError

ARCHS = ("resnet",)                  # libml: convnet, resnet, shake
NU = 2

# name -> (kind, default, help); libml's defaults, so `present` tells what the user passed.
DEFINITIONS = {
    "arch": ("string", "resnet", "libml: network; only resnet (the Wide ResNet) exists here."),
    "nu": ("integer", NU, "libml: augmentations per unlabeled image; always 2 here."),
    "shuffle": ("integer", 8192, "libml: shuffle buffer; given, it sets --shuffle_buffer."),
    "epochs": ("integer", 1024, "RealMix: stop after this many reports; given, the run length "
                                "becomes min(--train_kimg, epochs x --report_kimg)."),
    "log_device_placement": ("bool", False, "libml: log the device of every op."),
    "whiten": ("bool", False, "libml: per-channel whitening of the input; no effect here."),
    "para_parse": ("integer", 4, "libml: parsing threads; no effect here."),
    "para_augment": ("integer", 4, "libml: augmentation threads; no effect here."),
    "p_unlabeled": ("string", "", "libml: unlabeled class distribution; no effect here."),
    "class_mapping": ("string", "", "RealMix: class-name JSON; no effect here."),
    "custom_dataset": ("bool", True, "RealMix: allow unregistered names; no effect here."),
    "nclass": ("integer", 10, "RealMix: classes of a custom set; no effect here."),
    "img_size": ("integer", 32, "RealMix: image size of a custom set; no effect here."),
    "label_size": ("spaceseplist", "250 500 1000 2000 4000", "RealMix: registered label "
                                                               "counts; no effect here."),
    "valid_size": ("spaceseplist", "1 500", "RealMix: registered validation sizes; no effect here."),
    "augment": ("string", "cifar10", "RealMix: augmentation of a custom set; no effect here."),
    "memoize": ("bool", True, "RealMix: keep a custom set in memory; no effect here."),
    "perform_inference": ("bool", False, "RealMix: unused there too; no effect here."),
    "inference_dir": ("string", "", "RealMix: unused there too; no effect here."),
    "inference_ckpt": ("string", "", "RealMix: unused there too; no effect here."),
}

NO_EFFECT = {
    "whiten": "images are scaled to [-1, 1], libml's default",
    "para_parse": "tf.data tunes its own parallelism",
    "para_augment": "tf.data tunes its own parallelism",
    "p_unlabeled": "RealMix does not use it",
    "class_mapping": "class names come from {name}-meta.json",
    "custom_dataset": "every dataset name is accepted",
    "nclass": "the class count comes from the dataset",
    "img_size": "the image size comes from the dataset",
    "label_size": "every split in the dataset name is accepted",
    "valid_size": "every validation size in the dataset name is accepted",
    "augment": "augmentation comes from the dataset (flip, shift in {name}-meta.json)",
    "memoize": "small sets are cached in memory automatically",
    "perform_inference": "use python -m realmix_tf.predict",
    "inference_dir": "use python -m realmix_tf.predict --images",
    "inference_ckpt": "use python -m realmix_tf.predict --model",
}
MAPPED = {"shuffle": "--shuffle_buffer", "epochs": "--train_kimg",
          "log_device_placement": "tf.debugging.set_log_device_placement"}


def define(flag_values=flags.FLAGS) -> None:
    """Defines the libml flags that `flag_values` lacks (idempotent)."""
    for name, (kind, default, help_text) in DEFINITIONS.items():
        if name not in flag_values:
            getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=flag_values)


def given(flag_values) -> List[str]:
    """The libml flags present on the command line, in DEFINITIONS order."""
    return [n for n in DEFINITIONS if n in flag_values and flag_values[n].present]


def resolve(flag_values, train_kimg: float, report_kimg: float,
            shuffle_buffer_given: bool) -> Tuple[Dict[str, float], List[str]]:
    """(TrainConfig overrides, note lines) for the libml flags on the command line.
    Impossible values are a UserError; flags without effect give one note line in total."""
    overrides: Dict[str, float] = {}
    notes: List[str] = []
    present = given(flag_values)
    if "arch" in present and flag_values.arch not in ARCHS:
        raise UserError(f"--arch={flag_values.arch}: only resnet (the Wide ResNet) is implemented "
                        f"here: pass --arch=resnet or drop the flag")
    if "nu" in present and flag_values.nu != NU:
        raise UserError(f"--nu={flag_values.nu}: RealMix and MixMatch here always use 2 "
                        f"augmentations per unlabeled image: pass --nu=2 or drop the flag")
    if "shuffle" in present:
        if flag_values.shuffle < 0:
            raise UserError(f"--shuffle={flag_values.shuffle} is negative: use 0 or more")
        if shuffle_buffer_given:
            notes.append("--shuffle ignored: --shuffle_buffer is given")
        else:
            overrides["shuffle_buffer"] = flag_values.shuffle
    if "epochs" in present:
        if flag_values.epochs < 1:
            raise UserError(f"--epochs={flag_values.epochs} must be positive: pass a number of reports")
        limit = flag_values.epochs * report_kimg
        if limit < train_kimg:
            overrides["train_kimg"] = limit
            notes.append(f"--epochs={flag_values.epochs}: run length {limit:g} kimg "
                         f"({flag_values.epochs} reports of {report_kimg:g} kimg)")
    inert = [n for n in present if n in NO_EFFECT]
    if inert:
        notes.append("libml flags without effect here: " + "; ".join(
            f"--{n} ({NO_EFFECT[n].format(name='<dataset>')})" for n in inert))
    return overrides, notes


def apply_runtime(flag_values) -> None:
    """Runtime effects (not part of the run's configuration): --log_device_placement."""
    if "log_device_placement" in flag_values and flag_values.log_device_placement:
        import tensorflow as tf
        tf.debugging.set_log_device_placement(True)
