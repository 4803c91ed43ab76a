"""Every image augmentation, batched, stateless, uint8 in and out.

- training-time Augment (paper §3.1, spec §4): random horizontal flip and random translation
  (`augment`), applied to every labeled and unlabeled view by libml.data;
- Extend's copies (paper §3.1, spec §4.1), by name in AUGMENTATIONS: erase (Random Erasing),
  cutout, simple (= the training Augment), none. Adding one = a function + one table line.

Batched and vectorised: every image of the batch gets its own random draw, computed with
stateless random ops from one ``seed`` (an int32/int64 tensor of shape [2]). The same seed
gives the same result eagerly, inside ``tf.function`` and inside ``tf.data``.

The ops only move pixels, so they work on any dtype (uint8 straight from the PNG decoder, or
float32 in [-1, 1]) and preserve it.
"""
import tensorflow as tf

from libml.errors import UserError


def as_batch(images):
    """Lets the ops accept one [H,W,C] image as well as a [N,H,W,C] batch."""
    images = tf.convert_to_tensor(images)
    if images.shape.rank == 3:
        return images[None], True
    if images.shape.rank != 4:
        raise ValueError(f"expected images of shape [N,H,W,C] or [H,W,C], got {images.shape}")
    return images, False


def unbatch_if_single(images, was_single):
    return images[0] if was_single else images


def flip_lr(images, seed):
    """Mirrors each image left-right with probability 0.5, independently per image."""
    images, single = as_batch(images)
    batch = tf.shape(images)[0]
    do_flip = tf.random.stateless_uniform([batch], seed) < 0.5
    flipped = tf.where(do_flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return unbatch_if_single(flipped, single)


def translate(images, seed, shift: int = 4):
    """Reflect-pads each image by `shift` and crops it back at a random offset, per image.

    The result is a translation by (dy, dx) drawn uniformly from [-shift, shift]^2. REFLECT
    padding does not repeat the edge pixel: [a b c d] padded by 2 is [c b a b c d c b].
    """
    images, single = as_batch(images)
    if shift <= 0:
        return unbatch_if_single(images, single)
    height, width = images.shape[1], images.shape[2]
    for size in (height, width):
        if size is not None and size <= shift:
            raise ValueError(f"translate: shift={shift} needs images larger than {shift} pixels, "
                             f"got {height}x{width}")
    dynamic = tf.shape(images)
    batch, height, width = dynamic[0], dynamic[1], dynamic[2]
    padded = tf.pad(images, [[0, 0], [shift, shift], [shift, shift], [0, 0]], mode="REFLECT")
    # Crop offset in the padded image; offset o means translation o - shift.
    offsets = tf.random.stateless_uniform([batch, 2], seed, minval=0, maxval=2 * shift + 1,
                                          dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(height)[None, :]    # [N, H]
    cols = offsets[:, 1:] + tf.range(width)[None, :]     # [N, W]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)    # [N, H, W + 2 shift, C]
    cropped = tf.gather(cropped, cols, axis=2, batch_dims=1)   # [N, H, W, C]
    return unbatch_if_single(cropped, single)


def augment(images, seed, flip: bool = True, shift: int = 4):
    """Augment = translate(flip(x)), spec §4 `augment_cifar10` (flip=False: `augment_svhn`)."""
    seed = tf.convert_to_tensor(seed)
    flip_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if flip:
        images = flip_lr(images, flip_seed)
    return translate(images, shift_seed, shift)


# ---------------------------------------------------------------------------------------------
# Extend's augmentations

def _paint_boxes(images, top, left, height, width, value, apply):
    """Sets rows [top, top+height) x cols [left, left+width) of image i to value[i] where apply[i]."""
    shape = tf.shape(images)
    rows = tf.range(shape[1])[None, :, None]
    cols = tf.range(shape[2])[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + height)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + width)[:, None, None])
              & apply[:, None, None])
    value = tf.cast(value, images.dtype)[:, None, None, None]
    return tf.where(inside[..., None], value, images)


def random_erase(images, seed, p: float = 0.3, area=(0.02, 0.4), aspect=(0.3, 1 / 0.3),
                 fill=(0, 255), placement: str = "inside", candidates: int = 64):
    """Random Erasing (Zhong et al.), as the released ``random_eraser`` meant it (spec §4.1).

    With probability p an image gets one box of area s ~ U(area) * H * W and aspect ratio
    r ~ U(aspect), ``w = int(sqrt(s / r))``, ``h = int(sqrt(s * r))``, filled on all channels
    with one grey level ``int(U(fill))`` (0..254 by default: the released float fill was
    truncated by the uint8 PNG encoder).

    The box lies fully inside the image. Both placements are vectorised rejection sampling:
    ``candidates`` draws per image, the first acceptable one is used.
      - "inside" (default): reject (s, r) only if the box is larger than the image, then
        place its top-left corner uniformly among the positions where it fits (Zhong et
        al.). Erased areas follow U(area) up to the integer rounding and the rare oversized
        draws.
      - "reject": the released numpy loop: top-left uniform over the whole image, redraw
        everything until the box fits. This favours small boxes (mean erased area 13.6 %
        of a 32x32 image instead of 20 %).
    With 64 candidates, no acceptable draw has probability < 1e-9 ("reject", 32x32);
    then the last draw is clipped into the image.
    """
    images, single = as_batch(images)
    if placement not in ("inside", "reject"):
        raise ValueError(f"placement must be 'inside' or 'reject', got {placement!r}")
    shape = tf.shape(images)
    n, height, width = shape[0], shape[1], shape[2]
    seeds = tf.unstack(tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), 5))
    apply = tf.random.stateless_uniform([n], seeds[0]) < p
    pixels = tf.cast(height * width, tf.float32)
    s = tf.random.stateless_uniform([n, candidates], seeds[1], area[0], area[1]) * pixels
    r = tf.random.stateless_uniform([n, candidates], seeds[2], aspect[0], aspect[1])
    box_w = tf.cast(tf.floor(tf.sqrt(s / r)), tf.int32)
    box_h = tf.cast(tf.floor(tf.sqrt(s * r)), tf.int32)
    u_left, u_top = tf.unstack(tf.random.stateless_uniform([2, n, candidates], seeds[3]))
    if placement == "inside":
        fits = (box_w <= width) & (box_h <= height)
        left = tf.cast(u_left * tf.cast(tf.maximum(width - box_w + 1, 1), tf.float32), tf.int32)
        top = tf.cast(u_top * tf.cast(tf.maximum(height - box_h + 1, 1), tf.float32), tf.int32)
    else:
        left = tf.cast(u_left * tf.cast(width, tf.float32), tf.int32)
        top = tf.cast(u_top * tf.cast(height, tf.float32), tf.int32)
        fits = (left + box_w <= width) & (top + box_h <= height)
    # First acceptable candidate; the last one if none is (then clipped below).
    any_fit = tf.reduce_any(fits, axis=1)
    first = tf.where(any_fit, tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32),
                     candidates - 1)

    def pick(values):
        return tf.gather(values, first, axis=1, batch_dims=1)

    box_w = tf.minimum(pick(box_w), width)
    box_h = tf.minimum(pick(box_h), height)
    left = tf.minimum(pick(left), width - box_w)
    top = tf.minimum(pick(top), height - box_h)
    grey = tf.floor(tf.random.stateless_uniform([n], seeds[4], float(fill[0]), float(fill[1])))
    out = _paint_boxes(images, top, left, box_h, box_w, grey, apply)
    return unbatch_if_single(out, single)


def cutout(images, seed, size: int = 16, fill: int = 128):
    """CutOut (DeVries & Taylor): a size x size square, centre anywhere, clipped at the borders.

    Applied to every image. Their code zeroes normalised pixels (the dataset mean); here the
    fill is mid-grey 128, i.e. about 0 in the [-1, 1] training range.
    """
    images, single = as_batch(images)
    shape = tf.shape(images)
    n, height, width = shape[0], shape[1], shape[2]
    seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), 2))
    centre_y = tf.random.stateless_uniform([n], seed_y, 0, height, dtype=tf.int32)
    centre_x = tf.random.stateless_uniform([n], seed_x, 0, width, dtype=tf.int32)
    top = tf.clip_by_value(centre_y - size // 2, 0, height)
    left = tf.clip_by_value(centre_x - size // 2, 0, width)
    bottom = tf.clip_by_value(centre_y + size // 2, 0, height)
    right = tf.clip_by_value(centre_x + size // 2, 0, width)
    out = _paint_boxes(images, top, left, bottom - top, right - left,
                       tf.fill([n], fill), tf.ones([n], tf.bool))
    return unbatch_if_single(out, single)


# name -> f(images, seed, flip): the augmentations of Extend's copies (--aug / --extend_aug).
AUGMENTATIONS = {
    "erase": lambda images, seed, flip: random_erase(images, seed),
    "cutout": lambda images, seed, flip: cutout(images, seed),
    "simple": lambda images, seed, flip: augment(images, seed, flip=flip),   # paper Table 5
    # Plain duplicates: what the released make_aug_copy effectively produced (spec §4.1).
    "none": lambda images, seed, flip: tf.convert_to_tensor(images),
}


def check_name(aug: str) -> str:
    if aug not in AUGMENTATIONS:
        raise UserError(f"unknown augmentation {aug!r}: use one of {', '.join(AUGMENTATIONS)}")
    return aug


def augment_copy(images, seed, aug: str, flip: bool = True):
    """Applies the Extend augmentation named `aug` (a key of AUGMENTATIONS) to a batch."""
    return AUGMENTATIONS[check_name(aug)](images, seed, flip)


def to_float(images):
    """uint8 [0, 255] -> float32 [-1, 1], as the released code: x * (2/255) - 1."""
    return tf.cast(images, tf.float32) * (2.0 / 255) - 1.0
