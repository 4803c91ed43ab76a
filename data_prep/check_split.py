"""Reports image overlap between the labeled, unlabeled, validation and test sets of a split.

    python -m data_prep.check_split --dataset=cifar10.3@250-5000 [--data_dir=...]
    python -m data_prep.check_split --labeled=L.tfrecord --unlabeled=U.tfrecord --test=T.tfrecord --nvalid=5000

Images are compared by a SHA-512 of their decoded pixels (so re-encoded PNGs still match).
Validation = the first nvalid records of the unlabeled file; unlabeled = the rest (as
training reads them). Exit code 1 when a test image is in the labeled, unlabeled or
validation set, or a labeled image is in the unlabeled or validation set; 0 otherwise;
2 on bad input. Exact duplicates already present in the source data count as leaks too.
A leaked record made by `create_datasets custom` is also named by its image file (the
records' `source` path, carried into the split files by create_split).
"""
import hashlib
from typing import Dict, List, Sequence

import numpy as np
from absl import flags

from libml.base import cli

from libml.base import files as io

from libml.data import names

from libml.data import records
from libml.base.errors import UserError

FLAGS = flags.FlagValues()
flags.DEFINE_string("dataset", "", "Dataset name, e.g. cifar10.3@250-5000.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "", "Data folder (default: $ML_DATA).", flag_values=FLAGS)
flags.DEFINE_string("labeled", "", "Explicit labeled file (instead of --dataset).", flag_values=FLAGS)
flags.DEFINE_string("unlabeled", "", "Explicit unlabeled(+validation) file.", flag_values=FLAGS)
flags.DEFINE_string("test", "", "Explicit test file.", flag_values=FLAGS)
flags.DEFINE_integer("nvalid", 0, "Explicit files: validation = the first nvalid unlabeled records.",
                     flag_values=FLAGS)
flags.DEFINE_integer("show", 5, "How many leaked record positions to print per pair.", flag_values=FLAGS)

LEAKS = (("test", "labeled"), ("test", "unlabeled"), ("test", "valid"),
         ("labeled", "unlabeled"), ("labeled", "valid"))


def file_digests(path: str) -> List[bytes]:
    """Pixel digests of every record of `path`, in order."""
    import tensorflow as tf
    records.require_file(path, "python -m data_prep.create_split (or create_datasets)")
    ds = tf.data.TFRecordDataset(path).map(lambda r: records.decode_image(records.parse_example(r)["image"]),
                                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    try:
        return [image_digest(im) for im in io.progress(ds.as_numpy_iterator(), f"hashing {path.split('/')[-1]}")]
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        raise records.corrupt_error(path, e) from None


def image_digest(image: np.ndarray) -> bytes:
    """SHA-512 of the decoded pixels and shape (so re-encoded PNGs still match)."""
    h = hashlib.sha512(str(tuple(image.shape)).encode())
    h.update(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
    return h.digest()


def split_sets(labeled: Sequence[bytes], unlabeled: Sequence[bytes], test: Sequence[bytes],
               nvalid: int) -> Dict[str, List[bytes]]:
    return {"labeled": list(labeled), "unlabeled": list(unlabeled[nvalid:]),
            "valid": list(unlabeled[:nvalid]), "test": list(test)}


def overlap_matrix(sets: Dict[str, Sequence[bytes]]) -> np.ndarray:
    """[i, j] = images of set i also in set j; [i, i] = repeated images within set i."""
    keys = list(sets)
    unique = {k: set(v) for k, v in sets.items()}
    matrix = np.zeros([len(keys), len(keys)], np.int64)
    for i, a in enumerate(keys):
        for j, b in enumerate(keys):
            matrix[i, j] = (len(sets[a]) - len(unique[a]) if i == j
                            else sum(1 for d in sets[a] if d in unique[b]))
    return matrix


def leaks(sets: Dict[str, Sequence[bytes]]) -> Dict[str, List[int]]:
    """'a in b' -> positions (within set a) of the images of a found in b, for LEAKS pairs."""
    found = {}
    for a, b in LEAKS:
        in_b = set(sets[b])
        positions = [i for i, d in enumerate(sets[a]) if d in in_b]
        if positions:
            found[f"{a} in {b}"] = positions
    return found


def report(sets: Dict[str, Sequence[bytes]], show: int = 5,
           sources: Dict[str, Sequence[str]] = None) -> int:
    """Prints the overlap matrix and the leaks; returns the exit code (1 if any leak).
    sources: {set: image file of each record ("" unknown)}, as split_sets orders them."""
    keys = list(sets)
    matrix = overlap_matrix(sets)
    width = max(10, *(len(k) + 2 for k in keys))
    print("rows: images of the set also found in the column set (diagonal: repeats within the set)")
    print(f"{'':>{width}}{'size':>{width}}" + "".join(f"{k:>{width}}" for k in keys))
    for i, k in enumerate(keys):
        print(f"{k:>{width}}{len(sets[k]):>{width}}" + "".join(f"{n:>{width}}" for n in matrix[i]))
    found = leaks(sets)
    for pair, positions in found.items():
        shown = ", ".join(map(str, positions[:show])) + (" ..." if len(positions) > show else "")
        print(f"LEAK: {len(positions)} images of {pair} (positions in the first set: {shown})")
        a, b = pair.split(" in ")
        files_a, files_b = (sources or {}).get(a, []), (sources or {}).get(b, [])
        first_in_b = {}
        for j, digest in enumerate(sets[b]):
            first_in_b.setdefault(digest, j)
        for i in positions[:show]:
            j = first_in_b[sets[a][i]]
            here = files_a[i] if i < len(files_a) and files_a[i] else ""
            there = files_b[j] if j < len(files_b) and files_b[j] else ""
            if here or there:
                print(f"  {a} #{i} {here or '(no source path)'} = {b} #{j} {there or '(no source path)'}")
    if not found:
        print("no leak: the test set and the labeled set are disjoint from the training data")
    return 1 if found else 0


def main(argv=None) -> int:
    cli.parse(FLAGS, argv)
    explicit = [FLAGS.labeled, FLAGS.unlabeled, FLAGS.test]
    if FLAGS.dataset:
        if any(explicit):
            raise UserError("pass either --dataset or --labeled/--unlabeled/--test, not both")
        dataset = names.parse_dataset_name(FLAGS.dataset)
        root = names.data_dir(FLAGS.data_dir)
        paths = [dataset.label_path(root), dataset.unlabel_path(root), dataset.test_path(root)]
        nvalid = dataset.nvalid
    else:
        if not all(explicit):
            raise UserError("nothing to check: pass --dataset=cifar10.3@250-5000 or all of "
                            "--labeled, --unlabeled and --test")
        if FLAGS.nvalid < 0:
            raise UserError(f"--nvalid={FLAGS.nvalid}: use 0 or more")
        paths, nvalid = explicit, FLAGS.nvalid
    for path in paths:
        records.require_file(path, "python -m data_prep.create_split (or create_datasets)")
    labeled, unlabeled, test = (file_digests(p) for p in paths)
    if nvalid > len(unlabeled):
        raise UserError(f"validation size {nvalid} exceeds the {len(unlabeled)} unlabeled records: "
                        "use a smaller validation size")
    sources = split_sets(*(records.load_sources(p) for p in paths), nvalid)
    return report(split_sets(labeled, unlabeled, test, nvalid), FLAGS.show, sources)


if __name__ == "__main__":
    cli.run(main, FLAGS)
