"""Reading users' image files: the ONE loader behind `create_datasets custom` and `predict`.

Both tools call `load_images`, so a model is asked about exactly the pixels it was trained on:

1. EXIF orientation applied (photos taken sideways stand up);
2. every PIL mode brought to 8-bit grayscale (L) or RGB: 1 -> L; I;16 / I (16-bit PNG, TIFF)
   -> L scaled by 255/65535; F -> L (values in [0, 1] scaled by 255, else clipped to [0, 255]);
   LA / RGBA / PA / transparent P -> composited over white; P, CMYK, YCbCr, LAB, HSV -> RGB;
3. the shorter side resized to `size` (bicubic, PIL's antialiased filter), then the centre
   cropped to size x size;
4. channels: grayscale images keep one channel unless `channels=3` (repeated after resizing);
   `channels=1` turns colour images into L (ITU-R 601-2 luma) before resizing.

Supported files: EXTENSIONS (any case); animated GIF/WebP give their first frame. Folders are
searched recursively; hidden files and folders (name starting with '.') are ignored. Files with
another extension are counted, not read. An unreadable file stops the load with one line naming
it, unless `skip_bad=True`, which leaves it out and lists it in the `ReadSummary`.
"""
import concurrent.futures
import dataclasses
import fnmatch
import glob
import os
import stat
from collections import Counter
from typing import List, Optional, Sequence, Tuple

import numpy as np

from libml.base.errors import UserError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FORMATS = "PNG, JPEG, BMP, GIF, WebP, TIFF"
BACKGROUND = 255            # transparent pixels become white
SKIP_FLAG = "--skip_bad_images"
_LISTED_BAD = 20            # bad files named one per line in a summary; the rest are counted
# Pixel cap of one image: decoding costs memory and time in proportion to the pixel count,
# whatever the file size (a 280 KB 144-megapixel PNG took 4.6 GB and 36 s), and Pillow only
# warns below its own limit. 50 megapixels holds every camera photo but the largest sensors.
MAX_MEGAPIXELS = 50
MEGAPIXELS_FLAG = "--max_megapixels"
NOT_REGULAR = "(not a regular file)"


@dataclasses.dataclass
class ReadSummary:
    """What a load read and what it left out, and why."""
    read: int = 0
    not_images: Counter = dataclasses.field(default_factory=Counter)   # extension -> files
    bad: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)
    outside: int = 0            # files beside the class folders (not in any class)

    def line(self, what: str = "images") -> str:
        """`read 120 images; skipped 3: 2 not images (.txt 1, .svg 1), 1 unreadable`."""
        parts = []
        if self.not_images:
            kinds = ", ".join(f"{ext or '(no extension)'} {n}" for ext, n in sorted(self.not_images.items()))
            parts.append(f"{sum(self.not_images.values())} not {FORMATS} ({kinds})")
        if self.outside:
            parts.append(f"{self.outside} outside the class folders")
        if self.bad:
            parts.append(f"{len(self.bad)} unreadable")
        skipped = sum(self.not_images.values()) + self.outside + len(self.bad)
        return f"read {self.read} {what}" + (f"; skipped {skipped}: {', '.join(parts)}" if parts else "")

    def lines(self, what: str = "images") -> List[str]:
        """The summary line, then one line per unreadable file (the first 20)."""
        out = [self.line(what)]
        out += [f"  unreadable {path}: {reason}" for path, reason in self.bad[:_LISTED_BAD]]
        if len(self.bad) > _LISTED_BAD:
            out.append(f"  ... and {len(self.bad) - _LISTED_BAD} more unreadable files")
        return out


# ---------------------------------------------------------------------------------------------
# Finding files

def is_image_name(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def is_regular(path: str) -> bool:
    """A regular file (or a link to one): never a FIFO, socket or device, whose reading can
    block forever or never end."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _match(patterns: Sequence[str], names: Sequence[str]) -> bool:
    """glob's rules on path components: `**` matches any number of non-hidden folders, `*`
    and `?` do not match a leading '.'."""
    if not patterns:
        return not names
    if patterns[0] == "**":
        return any(_match(patterns[1:], names[k:]) for k in range(len(names) + 1)
                   if not any(_hidden(n) for n in names[:k]))
    if not names or (_hidden(names[0]) and not _hidden(patterns[0])):
        return False
    return fnmatch.fnmatchcase(names[0], patterns[0]) and _match(patterns[1:], names[1:])


def expand_pattern(spec: str) -> List[str]:
    """The regular files matching the shell pattern `spec`, sorted, like
    glob.glob(spec, recursive=True), except that `**` follows a folder link only to a folder
    not seen yet: links that loop back (a/loop -> a) are walked once instead of forever."""
    parts = spec.split(os.sep)
    if "**" not in parts:
        return sorted(p for p in glob.glob(spec) if is_regular(p))
    first = parts.index("**")
    base = os.sep.join(parts[:first])
    if not base and spec.startswith(os.sep):
        base = os.sep
    bases = (glob.glob(base) if glob.has_magic(base) else [base]) if base else [""]
    found = set()
    for root in bases:
        top = root or os.curdir
        if not os.path.isdir(top):
            continue
        seen = set()
        for folder, dirs, files in os.walk(top, followlinks=True):
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                dirs[:] = []
                continue
            seen.add((info.st_dev, info.st_ino))
            rel = os.path.relpath(folder, top)
            rel_parts = [] if rel == os.curdir else rel.split(os.sep)
            for name in files:
                if _match(parts[first:], rel_parts + [name]):
                    path = os.path.join(root, *rel_parts, name) if root else os.path.join(*rel_parts, name)
                    if is_regular(path):
                        found.add(path)
    return sorted(found)


def list_images(folder: str, summary: Optional[ReadSummary] = None) -> List[str]:
    """Image files under `folder` (recursive), sorted by path; other files are counted in
    `summary.not_images`."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        for name in files:
            if _hidden(name):
                continue
            if not is_regular(os.path.join(root, name)):
                if summary is not None:
                    summary.not_images[NOT_REGULAR] += 1
            elif is_image_name(name):
                found.append(os.path.join(root, name))
            elif summary is not None:
                summary.not_images[os.path.splitext(name)[1].lower()] += 1
    return sorted(found)


def find_images(specs: Sequence[str], summary: Optional[ReadSummary] = None,
                flag: str = "--images") -> List[Tuple[str, str]]:
    """(path, name to report) for each image named by `specs`: files, folders (searched
    recursively; the name is relative to the folder) and shell patterns (`photos/*.jpg`,
    `**` crosses folders). Order: specs in order, each one's files sorted; duplicates once."""
    if not specs:
        raise UserError(f"no {flag} given: pass image files, folders or patterns, e.g. {flag}=photos/")
    summary = summary if summary is not None else ReadSummary()
    found, seen = [], set()

    def add(path, shown):
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            found.append((path, shown))

    for spec in specs:
        if os.path.exists(spec) and not os.path.isdir(spec) and not is_regular(spec):
            raise UserError(f"{flag}={spec} is not a regular file (a FIFO, socket or device, which "
                            f"may never end): pass image files or folders")
        if os.path.isdir(spec):
            for path in list_images(spec, summary):
                add(path, os.path.relpath(path, spec))
            continue
        matches = [spec] if is_regular(spec) else expand_pattern(spec)
        if not matches:
            raise UserError(f"{flag}={spec}: no such file, folder or matching file: check the path "
                            f"(patterns such as photos/*.jpg are expanded here)")
        for path in matches:
            if is_image_name(path):
                add(path, path)
            else:
                summary.not_images[os.path.splitext(path)[1].lower()] += 1
    if not found:
        others = ", ".join(f"{ext or '(no extension)'} {n}" for ext, n in sorted(summary.not_images.items()))
        raise UserError(f"no images in {', '.join(specs)}{f' (only other files: {others})' if others else ''}: "
                        f"pass {FORMATS} files ({' '.join(EXTENSIONS)})")
    return found


# ---------------------------------------------------------------------------------------------
# One image

def _over_white(im, mode: str):
    from PIL import Image
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (BACKGROUND,) * 3 + (255,))
    return Image.alpha_composite(background, rgba).convert(mode)


def to_8bit(im):
    """`im` as an 8-bit L or RGB image (see the module docstring for each mode)."""
    from PIL import Image
    mode = im.mode
    if mode in ("L", "RGB"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I"):            # I;16, I;16B, I;16L, I;16N, I (16-bit PNG as I)
        values = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.round(np.clip(values, 0, 65535) * (255 / 65535)).astype(np.uint8))
    if mode == "F":
        values = np.asarray(im, np.float64)
        values = np.nan_to_num(values, nan=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255
        return Image.fromarray(np.round(np.clip(values, 0, 255)).astype(np.uint8))
    if mode in ("LA", "La"):
        return _over_white(im.convert("LA"), "L")
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        return _over_white(im, "RGB")
    return im.convert("RGB")            # P, CMYK, YCbCr, LAB, HSV, RGBX


def fit(im, size: int):
    """Shorter side resized to `size` (bicubic), centre cropped to size x size."""
    from PIL import Image
    w, h = im.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return im.crop((left, top, left + size, top + size))


class TooLarge(ValueError):
    """An image above the pixel cap (MAX_MEGAPIXELS or the user's --max_megapixels)."""


def load_image(path: str, size: int, channels: Optional[int] = None,
               max_megapixels: float = MAX_MEGAPIXELS) -> np.ndarray:
    """uint8 [size, size, C] of one file; C = `channels`, or 1 for grayscale and 3 otherwise.
    Raises OSError/ValueError-like errors of PIL for unreadable files (see `read_reason`),
    TooLarge above `max_megapixels` (checked from the header, before decoding), ValueError for
    what is not a regular file (a FIFO would block forever)."""
    from PIL import Image, ImageOps
    if isinstance(path, (str, bytes, os.PathLike)) and not is_regular(path):
        raise ValueError("not a regular file")
    # Pillow refuses images above twice its own limit at open; ours is the one that applies.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, int(max_megapixels * 1e6))
    with Image.open(path) as im:
        width, height = im.size
        if width * height > max_megapixels * 1e6:
            raise TooLarge(f"{width}x{height} is {width * height / 1e6:.1f} megapixels, above the "
                           f"cap of {max_megapixels:g}: pass {MEGAPIXELS_FLAG}={width * height / 1e6:.0f} "
                           f"or more to read it, or shrink the file")
        im.seek(0)
        im = to_8bit(ImageOps.exif_transpose(im))
        if channels == 1 and im.mode != "L":
            im = im.convert("L")
        array = np.asarray(fit(im, size), np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if channels == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def read_reason(path: str, error: Exception) -> str:
    """A short reason for an unreadable file, without the path PIL repeats."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    for form in (repr(path), f"'{path}'", path):
        text = text.replace(form, "").strip(" :")
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


def _try_load(path: str, size: int, channels: Optional[int], max_megapixels: float):
    try:
        return load_image(path, size, channels, max_megapixels), None
    except MemoryError:
        raise
    except Exception as e:    # PIL raises many types (OSError, SyntaxError, struct.error ...)
        return None, read_reason(path, e)


# ---------------------------------------------------------------------------------------------
# Many images

def load_images(paths: Sequence[str], size: int, channels: Optional[int] = None,
                skip_bad: bool = False, workers: int = 0, desc: Optional[str] = None,
                summary: Optional[ReadSummary] = None,
                max_megapixels: float = MAX_MEGAPIXELS) -> Tuple[List[np.ndarray], List[int], ReadSummary]:
    """Decodes `paths` in a thread pool (PIL releases the GIL), in order, with a progress bar
    when `desc` is given. Returns (arrays, positions in `paths` of the arrays, summary).
    An unreadable file is a UserError naming it, or, with `skip_bad`, listed in summary.bad;
    so is an image above `max_megapixels` (checked before it is decoded)."""
    check_megapixels(max_megapixels)
    from libml.base.files import progress
    summary = summary if summary is not None else ReadSummary()
    workers = workers or os.cpu_count() or 4
    arrays, kept = [], []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda p: _try_load(p, size, channels, max_megapixels), paths)
        for i, (array, reason) in enumerate(progress(results, desc, total=len(paths))):
            if reason is None:
                arrays.append(array)
                kept.append(i)
            elif skip_bad:
                summary.bad.append((paths[i], reason))
            else:
                raise UserError(f"unreadable image {paths[i]} ({reason}): fix or remove the file, "
                                f"or pass {SKIP_FLAG} to leave unreadable files out")
    summary.read += len(arrays)
    return arrays, kept, summary


def check_megapixels(value: float) -> None:
    if not (value > 0 and value < float("inf")):
        raise UserError(f"{MEGAPIXELS_FLAG}={value}: pass a positive number of megapixels "
                        f"(default {MAX_MEGAPIXELS})")


def same_channels(groups: List[List[np.ndarray]]) -> Tuple[List[List[np.ndarray]], int]:
    """One channel if every image is grayscale, else every image RGB (gray repeated)."""
    channels = 1 if all(im.shape[-1] == 1 for g in groups for im in g) else 3
    if channels == 3:
        groups = [[np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in g] for g in groups]
    return groups, channels
