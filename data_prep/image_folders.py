"""Custom datasets from folders of images (one sub-folder per class), for data_prep.create_datasets."""
import concurrent.futures
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from data_prep.archives import Prepared
from libml import datasets, io
from libml.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def list_images(folder: str) -> List[str]:
    """Image files directly in `folder` (.png .jpg .jpeg, any case), sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def list_class_folders(folder: str, flag: str) -> Dict[str, List[str]]:
    """{class name: image files} for the sub-folders of `folder`, classes sorted by name."""
    if not folder:
        raise UserError(f"custom needs {flag}: pass {flag}=DIR with one sub-folder of images per class")
    if not os.path.isdir(folder):
        raise UserError(f"{flag}={folder} is not a folder: pass a folder with one sub-folder per class")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise UserError(f"no class sub-folders in {folder}: put the images of each class in its own "
                        f"sub-folder (e.g. {folder}/cat/001.jpg)")
    result = {}
    for name in classes:
        files = list_images(os.path.join(folder, name))
        if not files:
            raise UserError(f"class folder {os.path.join(folder, name)} has no .png/.jpg/.jpeg images: "
                            "add images or remove the folder")
        result[name] = files
    return result


def load_image(path: str, size: int) -> np.ndarray:
    """Decodes one image; shorter side resized to `size`, centre-cropped to size x size.

    Grayscale images come back as [size,size,1], all others as RGB [size,size,3].
    """
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            im = im.convert("L" if gray else "RGB")
            w, h = im.size
            scale = size / min(w, h)
            new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((new_w, new_h), Image.BICUBIC)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            array = np.asarray(im, np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise UserError(f"unreadable image {path} ({type(e).__name__}): fix or remove the file") from None
    return array[:, :, None] if array.ndim == 2 else array


def load_images(paths: Sequence[str], size: int, desc: str, workers: int = 0) -> List[np.ndarray]:
    """Decodes images in a thread pool (PIL releases the GIL), in order, with a progress bar."""
    workers = workers or os.cpu_count() or 4
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(io.progress(pool.map(lambda p: load_image(p, size), paths), desc, len(paths)))


def _same_channels(groups: List[List[np.ndarray]]) -> Tuple[List[np.ndarray], int]:
    """Keeps one channel if every image is grayscale, else makes every image RGB."""
    channels = 1 if all(im.shape[-1] == 1 for g in groups for im in g) else 3
    if channels == 3:
        groups = [[np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in g] for g in groups]
    return groups, channels


def load_custom(name: str, labeled_dir: str, unlabeled_dir: str, test_dir: str, size: int,
                flip: bool = True, workers: int = 0) -> Prepared:
    labeled = list_class_folders(labeled_dir, "--labeled_dir")
    test = list_class_folders(test_dir, "--test_dir")
    class_names = list(labeled)
    unknown = sorted(set(test) - set(labeled))
    if unknown:
        raise UserError(f"test class folder {unknown[0]!r} has no labeled folder in {labeled_dir}: "
                        "use the same class folder names in --labeled_dir and --test_dir")
    unlabeled_files = []
    if unlabeled_dir:
        if not os.path.isdir(unlabeled_dir):
            raise UserError(f"--unlabeled_dir={unlabeled_dir} is not a folder: pass a folder of images")
        unlabeled_files = list_images(unlabeled_dir)
        if not unlabeled_files:
            raise UserError(f"no .png/.jpg/.jpeg images in {unlabeled_dir}: add images or drop --unlabeled_dir")

    def files_and_labels(folders):
        files = [f for c in folders for f in folders[c]]
        labels = [class_names.index(c) for c in folders for _ in folders[c]]
        return files, np.asarray(labels, np.int64)

    groups, labels = [], {}
    for subset, (files, subset_labels) in (("train", files_and_labels(labeled)), ("test", files_and_labels(test)),
                                           ("unlabeled", (unlabeled_files, None))):
        if files:
            groups.append(load_images(files, size, f"decoding {subset} images", workers))
            labels[subset] = subset_labels if subset_labels is not None else np.full(len(files), -1, np.int64)
    groups, channels = _same_channels(groups)
    subsets = {subset: (np.stack(images), labels[subset]) for subset, images in zip(labels, groups)}
    meta = datasets.make_meta(name, len(class_names), (size, size, channels), flip, class_names)
    return Prepared(name, subsets, meta)
