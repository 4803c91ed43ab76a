"""Every image augmentation, batched, stateless, uint8 in and out.

- training-time Augment (paper §3.1, spec §4): random horizontal flip and random translation
  (`augment`), applied to every labeled and unlabeled view by libml.data.pipeline;
- Extend's copies (paper §3.1, spec §4.1), by name in AUGMENTATIONS: erase (Random Erasing),
  cutout, simple (= the training Augment), none. Adding one = a function + one table line.
- the named training views in VIEWS an algorithm asks the input pipeline for (weak = the
  training Augment, strong = FixMatch's RandAugment + Cutout, none); same rule: one function
  + one table line.

Batched and vectorised: every image of the batch gets its own random draw, computed with
stateless random ops from one ``seed`` (an int32/int64 tensor of shape [2]). The same seed
gives the same result eagerly, inside ``tf.function`` and inside ``tf.data``.

The ops only move pixels, so they work on any dtype (uint8 straight from the PNG decoder, or
float32 in [-1, 1]) and preserve it.
"""
import tensorflow as tf

from libml.base.errors import UserError


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


def _known(name: str, table: dict) -> str:
    if name not in table:
        raise UserError(f"unknown augmentation {name!r}: use one of {', '.join(table)}")
    return name


def check_name(aug: str) -> str:
    return _known(aug, AUGMENTATIONS)


def augment_copy(images, seed, aug: str, flip: bool = True):
    """Applies the Extend augmentation named `aug` (a key of AUGMENTATIONS) to a batch."""
    return AUGMENTATIONS[check_name(aug)](images, seed, flip)


def to_float(images):
    """uint8 [0, 255] -> float32 [-1, 1], as the released code: x * (2/255) - 1."""
    return tf.cast(images, tf.float32) * (2.0 / 255) - 1.0


# ---------------------------------------------------------------------------------------------
# Training views by name (an algorithm declares e.g. ("weak", "strong") for its unlabeled data)
#
# "strong" is FixMatch's strong view (Sohn et al. 2020; google-research/fixmatch, augment
# "d.d.rac": RandAugment with random magnitude, then Cutout), applied to the weak view:
#   1. weak: flip + translate (`augment`);
#   2. RandAugment: 2 ops per IMAGE, each drawn uniformly (with replacement) from RA_OPS, each
#      applied with probability 0.5, at a level m drawn per image and op from {1, ..., 9} (of
#      10) and a random sign for the signed ops;
#   3. Cutout: a square of side 0.5 x min(H, W), centre anywhere, clipped at the borders, grey.
# The pixel operations are Keras 3's image preprocessing layers (their transform_images) and
# keras.ops.image.affine_transform. Their own random draws are not used: Keras 3.15's layers
# take only an int seed or a stateful SeedGenerator (a seed tensor raises ValueError), and
# keras.layers.RandAugment picks the same ops for the whole batch. Here every draw is a
# stateless TF op on `seed`, per image, and each op runs only on the images that drew it
# (tf.dynamic_partition / dynamic_stitch), so the cost is ~2 ops per image, vectorised.
# Levels follow FixMatch's PIL ops (third_party/auto_augment/augmentations.py):
#   rotate 3m degrees; shear 0.03m; translate m pixels per 32 of width; solarize threshold
#   256 - int(25.6m); posterize to 4 - int(0.4m) bits; colour/contrast/brightness/sharpness
#   enhancement factor v = 0.18m + 0.1 (1 = unchanged). Geometric ops use nearest
#   interpolation and fill grey, as PIL's default resampling and FixMatch's transparent fill
#   (0 in [-1, 1]) did.
# Known differences from PIL: brightness is Keras' additive shift by (v - 1) x 127.5 (PIL:
# multiply by v; the two agree at mid-grey);
# contrast blends towards each channel's mean (PIL: the mean grey level); sharpness and the
# geometric ops treat the borders as Keras does. Grayscale images (C = 1) go through the ops as
# a 3-channel tile and come back as channel 0 (every op treats the channels of a grey image
# alike, so this is exact; colour is then the identity, as PIL's Color on a grey image).

RA_OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "contrast",
          "brightness", "sharpness", "shear_x", "translate_x", "translate_y", "posterize",
          "shear_y")    # FixMatch's RANDOM_POLICY_OPS, in its order
RA_MAX_LEVEL = 10       # levels m are drawn from 1 .. RA_MAX_LEVEL - 1 (FixMatch: randint(1, 10))
GREY = 128.0


# No tensor-dependent Python control flow below: tf.data and tf.function need not run AutoGraph
# over these functions and the Keras code they call (that conversion took longer than tracing).
_plain_python = tf.autograph.experimental.do_not_convert


def _keras_layers():
    """The Keras layers whose transform_images the ops call, built once, outside any graph
    (they own SeedGenerator variables, never used here)."""
    if not hasattr(_keras_layers, "cache"):
        import keras
        with tf.init_scope():
            _keras_layers.cache = {
                "autocontrast": keras.layers.AutoContrast(value_range=(0, 255)),
                "equalize": keras.layers.Equalization(value_range=(0, 255)),
                "solarize": keras.layers.Solarization(value_range=(0, 255)),
                "color": keras.layers.RandomColorDegeneration(factor=0.5, value_range=(0, 255)),
                "contrast": keras.layers.RandomContrast(factor=0.5, value_range=(0, 255)),
                "brightness": keras.layers.RandomBrightness(factor=0.5, value_range=(0, 255)),
                "sharpness": keras.layers.RandomSharpness(factor=0.5, value_range=(0, 255)),
                "posterize": keras.layers.RandomPosterization(factor=(1, 8), value_range=(0, 255)),
            }
    return _keras_layers.cache


def _enhance(level):
    """FixMatch's enhancement factor for level m: 1.8 m / 10 + 0.1 (1 = unchanged)."""
    return level * 1.8 / RA_MAX_LEVEL + 0.1


def _per_image(values):
    return tf.reshape(values, [-1, 1, 1, 1])


def _affine(images, rows):
    """Each image resampled at the input point (a0 x + a1 y + a2, b0 x + b1 y + b2) of every
    output pixel (x, y), as PIL's Image.transform(AFFINE); rows: [n, 6]."""
    import keras
    zeros = tf.zeros([tf.shape(rows)[0], 2], tf.float32)
    return keras.ops.image.affine_transform(images, tf.concat([rows, zeros], axis=1),
                                            interpolation="nearest", fill_mode="constant",
                                            fill_value=GREY)


def _rotate(images, level, sign):
    angle = sign * tf.floor(level * 30.0 / RA_MAX_LEVEL) * (3.141592653589793 / 180)
    cy, cx = tf.unstack((tf.cast(tf.shape(images)[1:3], tf.float32) - 1) / 2)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Rotation about the image centre (cx, cy), output -> input.
    rows = tf.stack([cos, sin, cx - cos * cx - sin * cy,
                     -sin, cos, cy + sin * cx - cos * cy], axis=1)
    return _affine(images, rows)


def _shear(images, level, sign, axis):
    s = sign * level * 0.3 / RA_MAX_LEVEL
    one, zero = tf.ones_like(s), tf.zeros_like(s)
    rows = [one, s, zero, zero, one, zero] if axis == "x" else [one, zero, zero, s, one, zero]
    return _affine(images, tf.stack(rows, axis=1))


def _translate(images, level, sign, axis):
    # FixMatch: m pixels on its 32x32 images; scaled with the image size here.
    size = tf.cast(tf.shape(images)[2 if axis == "x" else 1], tf.float32)
    d = sign * tf.floor(level * 10.0 / RA_MAX_LEVEL) * (size / 32)
    one, zero = tf.ones_like(d), tf.zeros_like(d)
    rows = [one, zero, d, zero, one, zero] if axis == "x" else [one, zero, zero, zero, one, d]
    return _affine(images, tf.stack(rows, axis=1))


def _equalize(images):
    """Keras' Equalization histograms the whole batch at once: applied image by image."""
    layer = _keras_layers()["equalize"]
    return tf.map_fn(lambda image: layer.transform_images(image[None], None)[0], images,
                     fn_output_signature=tf.TensorSpec(images.shape[1:], tf.float32))


def _layer(name, **transformation):
    return lambda images: _keras_layers()[name].transform_images(images, transformation)


# name -> f(images float32 [n,H,W,3] in [0, 255], level float32 [n] in 1..9, sign float32 [n] of
# +-1) -> images
_RA_FUNCTIONS = {
    "identity": lambda x, m, s: x,
    "autocontrast": lambda x, m, s: _layer("autocontrast")(x),
    "equalize": lambda x, m, s: _equalize(x),
    "rotate": _rotate,
    "solarize": lambda x, m, s: _layer(
        "solarize", additions=_per_image(tf.zeros_like(m)),
        thresholds=_per_image(256.0 - tf.floor(m * 256.0 / RA_MAX_LEVEL)))(x),
    # Keras blends towards grey by `factor`; PIL's Color keeps a fraction v of the colour.
    "color": lambda x, m, s: _layer("color", factor=_per_image(1.0 - _enhance(m)))(x),
    "contrast": lambda x, m, s: _layer("contrast", contrast_factor=_per_image(_enhance(m)))(x),
    "brightness": lambda x, m, s: _layer(
        "brightness", rgb_delta=_per_image((_enhance(m) - 1.0) * 127.5))(x),
    # Keras blends towards the smoothed image by 1 - 2 factor; PIL's Sharpness by 1 - v.
    "sharpness": lambda x, m, s: _layer("sharpness", factor=_enhance(m) / 2)(x),
    "shear_x": lambda x, m, s: _shear(x, m, s, "x"),
    "translate_x": lambda x, m, s: _translate(x, m, s, "x"),
    "translate_y": lambda x, m, s: _translate(x, m, s, "y"),
    "posterize": lambda x, m, s: _layer(
        "posterize",
        shift_factor=tf.cast(8 - (4 - tf.floor(m * 4.0 / RA_MAX_LEVEL)), tf.uint8))(x),
    "shear_y": lambda x, m, s: _shear(x, m, s, "y"),
}
assert tuple(_RA_FUNCTIONS) == RA_OPS


def apply_ra_ops(images, ops, levels, signs):
    """Applies op RA_OPS[ops[i]] at level levels[i] (1..9) and sign signs[i] (+-1) to image i.

    images: float32 [N,H,W,3] in [0, 255]. Each op runs once, on the images that chose it.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    ops = tf.cast(ops, tf.int32)
    levels, signs = tf.cast(levels, tf.float32), tf.cast(signs, tf.float32)
    count = len(RA_OPS)
    positions = tf.dynamic_partition(tf.range(tf.shape(images)[0]), ops, count)
    parts = tf.dynamic_partition(images, ops, count)
    part_levels = tf.dynamic_partition(levels, ops, count)
    part_signs = tf.dynamic_partition(signs, ops, count)
    outputs = []
    for fn, x, m, s in zip(_RA_FUNCTIONS.values(), parts, part_levels, part_signs):
        # Some Keras ops refuse an empty batch (AutoContrast's min): skip the ops nobody chose.
        y = tf.cond(tf.shape(x)[0] > 0,
                    lambda fn=fn, x=x, m=m, s=s: tf.clip_by_value(tf.cast(fn(x, m, s), tf.float32),
                                                                  0.0, 255.0),
                    lambda x=x: x)
        y.set_shape([None] + images.shape[1:].as_list())
        outputs.append(y)
    out = tf.dynamic_stitch(positions, outputs)
    out.set_shape(images.shape)
    return out


@_plain_python
def rand_augment(images, seed, num_ops: int = 2, prob: float = 0.5):
    """FixMatch's RandAugment with random magnitude, per image; uint8 [N,H,W,C] in and out."""
    images, single = as_batch(images)
    channels = images.shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"rand_augment: images need 1 or 3 channels, got {images.shape}")
    x = tf.cast(images, tf.float32)
    if channels == 1:
        x = tf.tile(x, [1, 1, 1, 3])
    n = tf.shape(x)[0]
    for op_seed in tf.unstack(tf.random.experimental.stateless_split(tf.convert_to_tensor(seed),
                                                                     num_ops)):
        s_op, s_apply, s_level, s_sign = tf.unstack(tf.random.experimental.stateless_split(op_seed, 4))
        ops = tf.random.stateless_uniform([n], s_op, 0, len(RA_OPS), dtype=tf.int32)
        ops = tf.where(tf.random.stateless_uniform([n], s_apply) < prob, ops, 0)   # 0: identity
        levels = tf.random.stateless_uniform([n], s_level, 1, RA_MAX_LEVEL, dtype=tf.int32)
        signs = tf.where(tf.random.stateless_uniform([n], s_sign) < 0.5, -1.0, 1.0)
        x = apply_ra_ops(x, ops, levels, signs)
    if channels == 1:
        x = x[..., :1]
    out = tf.cast(tf.round(x), tf.uint8)
    return unbatch_if_single(out, single)


@_plain_python
def strong(images, seed, flip: bool = True, shift: int = 4):
    """FixMatch's strong view: weak (flip + translate), RandAugment, Cutout; uint8 in and out."""
    weak_seed, ra_seed, cutout_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), 3))
    images = augment(tf.convert_to_tensor(images, tf.uint8), weak_seed, flip=flip, shift=shift)
    images = rand_augment(images, ra_seed)
    side = tf.reduce_min(tf.shape(images)[-3:-1]) // 2
    return cutout(images, cutout_seed, size=side, fill=int(GREY))


# name -> f(images uint8 [N,H,W,C], seed int [2], flip: bool, shift: int) -> uint8 [N,H,W,C]:
# the views of the training data an algorithm declares by name.
VIEWS = {
    "weak": lambda images, seed, flip, shift: augment(images, seed, flip=flip, shift=shift),
    "strong": strong,
    "none": lambda images, seed, flip, shift: tf.convert_to_tensor(images),
}


def check_view(name: str) -> str:
    return _known(name, VIEWS)


@_plain_python
def view(name: str, images, seed, flip: bool = True, shift: int = 4):
    """The training view `name` (a key of VIEWS) of a batch.

    images: uint8 [N,H,W,C] (or one [H,W,C] image); N, H, W may be dynamic, C must be static
    (1 or 3 for "strong"). seed: int32/int64 [2], the stateless seed of this batch; the same
    seed gives the same view eagerly, in tf.function and in tf.data. flip / shift: the
    dataset's weak augmentation (mirror or not, translation in pixels). Returns uint8, same shape.
    """
    return VIEWS[check_view(name)](images, seed, flip, shift)
