"""Training-time Augment (paper §3.1, spec §4): random horizontal flip and random translation.

Batched and vectorised: every image of the batch gets its own random draw, computed with
stateless random ops from one ``seed`` (an int32/int64 tensor of shape [2]). The same seed
gives the same result eagerly, inside ``tf.function`` and inside ``tf.data``.

The ops only move pixels, so they work on any dtype (uint8 straight from the PNG decoder, or
float32 in [-1, 1]) and preserve it.
"""
import tensorflow as tf


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


def to_float(images):
    """uint8 [0, 255] -> float32 [-1, 1], as the released code: x * (2/255) - 1."""
    return tf.cast(images, tf.float32) * (2.0 / 255) - 1.0
