"""Extend: writes K augmented copies of a split's unlabeled training images (paper §3.1).

    python -m data_prep.extend_unlabeled --dataset=cifar10.3@250-5000 --copies=50 --aug=erase --seed=0

Output: $ML_DATA/SSL/extend/{dataset}/{aug}{copies}-seed{seed}/shard-*.tfrecord + manifest.json,
used in training by `python -m realmix_tf.realmix ... --extend=50 --extend_aug=erase --extend_seed=0`.
Re-running after an interruption finishes the missing shards. See docs/usage_extend.md.

The flags live in a private FlagValues (not absl's global FLAGS), so this module can be
imported next to other command-line modules that define flags of the same names.
"""
from absl import flags

from libml import augment, cli, extend, names
from libml.errors import UserError

FLAGS = flags.FlagValues()
flags.DEFINE_string("dataset", "", "Split to extend, {name}.{seed}@{nlabeled}-{nvalid}, e.g. "
                    "cifar10.3@250-5000. The first nvalid unlabeled records (validation) are "
                    "never extended.", flag_values=FLAGS)
flags.DEFINE_integer("copies", 50, "Number of augmented copies (paper: 50; Table 5: 25).", flag_values=FLAGS)
flags.DEFINE_string("aug", "erase", "Augmentation of the copies, one of "
                    + ", ".join(augment.AUGMENTATIONS) + " (libml/augment.py; erase = random "
                    "erasing, the paper's 'CutOut' as the released code meant it; none = plain "
                    "duplicates, the released code's effective behaviour).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the augmentations and shard order; the same seed "
                     "gives byte-identical shards.", flag_values=FLAGS)
flags.DEFINE_bool("keep_original", False, "Also store the un-augmented images once (as copy 0).",
                  flag_values=FLAGS)
flags.DEFINE_integer("shards", 0, "Number of shard files (0: one per copy). Each shard holds "
                     "whole copies.", flag_values=FLAGS)
flags.DEFINE_integer("png_compression", extend.PNG_COMPRESSION, "zlib level of the PNGs (0-9). "
                     "0 stores them uncompressed: ~35 % more disk than 1-9 for photos, but "
                     "twice as fast to decode in the training stream.", flag_values=FLAGS)
flags.DEFINE_integer("parallel", 0, "Parallel augment/encode workers (0: number of CPUs).",
                     flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Re-create a complete extension.", flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "", "Data folder (default: $ML_DATA).", flag_values=FLAGS)


def main(argv=None):
    rest = cli.parse(FLAGS, argv)
    if rest:
        raise UserError(f"unexpected arguments {rest}: pass everything as --flag=value")
    if not FLAGS.dataset:
        raise UserError("missing --dataset: pass the split to extend, e.g. --dataset=cifar10.3@250-5000")
    root = names.data_dir(FLAGS.data_dir)
    files = extend.extend_unlabeled(FLAGS.dataset, root, copies=FLAGS.copies, aug=FLAGS.aug, seed=FLAGS.seed,
                                    keep_original=FLAGS.keep_original, shards=FLAGS.shards or None,
                                    overwrite=FLAGS.overwrite, parallel=FLAGS.parallel or None,
                                    progress=FLAGS.progress, png_compression=FLAGS.png_compression)
    print(f"extension complete: {len(files)} shards in {files[0].rsplit('/', 1)[0]}")
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
