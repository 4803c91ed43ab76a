"""Custom datasets from folders of images (one sub-folder per class), for data_prep.create_datasets.

Images are read with libml/data/images.py, the loader `realmix_tf.predict` uses too (formats, EXIF
rotation, 8-bit conversion, shorter-side resize + centre crop): a model is asked about exactly
the pixels it was trained on. Class folders and the unlabeled folder are searched recursively;
what was read and what was skipped (and why) is printed per subset.
"""
import os
from typing import Dict, List

import numpy as np

from data_prep.archives import Prepared
from libml.data import datasets
from libml.data import images
from libml.base.errors import UserError


def list_class_folders(folder: str, flag: str, summary: images.ReadSummary) -> Dict[str, List[str]]:
    """{class name: image files} for the sub-folders of `folder` (each searched recursively),
    classes sorted by name; files beside the class folders are counted in `summary`."""
    if not folder:
        raise UserError(f"custom needs {flag}: pass {flag}=DIR with one sub-folder of images per class")
    if not os.path.isdir(folder):
        raise UserError(f"{flag}={folder} is not a folder: pass a folder with one sub-folder per class")
    entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    classes = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
    if not classes:
        raise UserError(f"no class sub-folders in {folder}: put the images of each class in its own "
                        f"sub-folder (e.g. {folder}/cat/001.jpg)")
    summary.outside += len(entries) - len(classes)
    result = {}
    for name in classes:
        files = images.list_images(os.path.join(folder, name), summary)
        if not files:
            raise UserError(f"class folder {os.path.join(folder, name)} has no {images.FORMATS} "
                            f"images: add images or remove the folder")
        result[name] = files
    return result


def available_memory() -> int:
    """Bytes of memory available to a new process (MemAvailable), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def check_memory(count: int, size: int) -> None:
    """UserError before decoding when `count` images of size x size x 3 (held in memory, then
    stacked: twice) cannot fit in the memory available."""
    need, free = 2 * count * size * size * 3, available_memory()
    if free and need > free:
        raise UserError(f"{count} images of {size}x{size} need about {need / 2**30:.1f} GB of "
                        f"memory, {free / 2**30:.1f} GB is available: use a smaller --size")


def channels_line(channels: int, colour: int, total: int) -> str:
    """Why the dataset has 1 or 3 channels (images.same_channels chose them)."""
    if channels == 1:
        return f"channels 1: all {total} images are grayscale"
    gray = total - colour
    return (f"channels 3 (RGB): {colour} of {total} images are in colour"
            + (f"; the {gray} grayscale ones are repeated to 3 channels" if gray else ""))


def load_custom(name: str, labeled_dir: str, unlabeled_dir: str, test_dir: str, size: int,
                flip: bool = True, workers: int = 0, skip_bad: bool = False,
                max_megapixels: float = images.MAX_MEGAPIXELS) -> Prepared:
    """Reads the three folders; prints what was read and skipped per subset. An unreadable image
    is a UserError naming it, or, with `skip_bad`, left out and listed."""
    summaries = {subset: images.ReadSummary() for subset in ("train", "test", "unlabeled")}
    labeled = list_class_folders(labeled_dir, "--labeled_dir", summaries["train"])
    test = list_class_folders(test_dir, "--test_dir", summaries["test"])
    class_names = list(labeled)
    if len(class_names) < 2:
        raise UserError(f"{labeled_dir} has {len(class_names)} class folder ({class_names[0]}): a "
                        f"classifier needs at least 2 classes; add a sub-folder per class")
    unknown = sorted(set(test) - set(labeled))
    if unknown:
        raise UserError(f"test class folder {unknown[0]!r} has no labeled folder in {labeled_dir}: "
                        "use the same class folder names in --labeled_dir and --test_dir")
    unlabeled_files = []
    if unlabeled_dir:
        if not os.path.isdir(unlabeled_dir):
            raise UserError(f"--unlabeled_dir={unlabeled_dir} is not a folder: pass a folder of images")
        unlabeled_files = images.list_images(unlabeled_dir, summaries["unlabeled"])
        if not unlabeled_files:
            raise UserError(f"no {images.FORMATS} images in {unlabeled_dir}: add images or drop "
                            f"--unlabeled_dir")
    check_memory(sum(len(f) for f in labeled.values()) + sum(len(f) for f in test.values())
                 + len(unlabeled_files), size)

    def files_and_labels(folders):
        files = [f for c in folders for f in folders[c]]
        labels = [class_names.index(c) for c in folders for _ in folders[c]]
        return files, np.asarray(labels, np.int64)

    groups, labels, sources = [], {}, {}
    for subset, (files, subset_labels) in (("train", files_and_labels(labeled)), ("test", files_and_labels(test)),
                                           ("unlabeled", (unlabeled_files, None))):
        if not files:
            continue
        arrays, kept, _ = images.load_images(files, size, None, skip_bad, workers,
                                             f"decoding {subset} images", summaries[subset],
                                             max_megapixels)
        if not arrays:
            raise UserError(f"no {subset} image could be read: see the list above; fix or convert the files")
        groups.append(arrays)
        labels[subset] = (subset_labels[kept] if subset_labels is not None
                          else np.full(len(arrays), -1, np.int64))
        sources[subset] = [os.path.abspath(files[i]) for i in kept]     # kept in the records
        for line in summaries[subset].lines(f"{subset} images"):
            print(line)
    print(f"classes ({len(class_names)}, label = position, from the sub-folder names of "
          f"{labeled_dir}): {', '.join(class_names)}")
    colour = sum(im.shape[-1] != 1 for g in groups for im in g)
    groups, channels = images.same_channels(groups)
    print(channels_line(channels, colour, sum(len(g) for g in groups)))
    subsets = {subset: (np.stack(arrays), labels[subset]) for subset, arrays in zip(labels, groups)}
    meta = datasets.make_meta(name, len(class_names), (size, size, channels), flip, class_names)
    return Prepared(name, subsets, meta, sources=sources)
