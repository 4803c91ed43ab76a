"""Augment (spec §4): flip p=0.5 and reflect-pad-4 translation, per image, stateless."""
import numpy as np
import pytest
import tensorflow as tf

from libml.data import augment
from tests.fixtures_data import test_options

SEED = tf.constant([7, 11], tf.int64)


def position_images(count, size=16, channels=1, dtype=np.int32):
    """Identical images whose pixel value encodes its position: 100*row + col."""
    grid = 100 * np.arange(size)[:, None] + np.arange(size)[None, :]
    return np.broadcast_to(grid[None, :, :, None], [count, size, size, channels]).astype(dtype)


def offsets_of(out, shift=4):
    """(dy, dx) translation of each output, read at pixel (shift, shift): x[shift+dy, shift+dx]."""
    value = np.asarray(out)[:, shift, shift, 0]
    return value // 100 - shift, value % 100 - shift


def test_reflect_padding_matches_spec_example():
    row = np.array([[1, 2, 3, 4]], np.int32)              # [a b c d]
    padded = tf.pad(row, [[0, 0], [2, 2]], mode="REFLECT").numpy()
    np.testing.assert_array_equal(padded, [[3, 2, 1, 2, 3, 4, 3, 2]])  # [c b a b c d c b]


def test_translate_is_reflect_pad_then_crop_per_image(rng):
    images = rng.randint(0, 1 << 20, size=[64, 10, 10, 2]).astype(np.int32)
    out = augment.translate(images, SEED, shift=4).numpy()
    padded = np.pad(images, [[0, 0], [4, 4], [4, 4], [0, 0]], mode="reflect")
    found = set()
    for i in range(len(images)):
        matches = [(oy, ox) for oy in range(9) for ox in range(9)
                   if np.array_equal(padded[i, oy:oy + 10, ox:ox + 10], out[i])]
        assert len(matches) == 1, f"image {i} is not one reflect-pad crop"
        found.add(matches[0])
    assert len(found) > 20    # offsets drawn per image, not once per batch


def test_translate_offsets_uniform_over_9x9():
    out = augment.translate(position_images(81 * 200), SEED, shift=4)
    dy, dx = offsets_of(out)
    assert dy.min() == -4 and dy.max() == 4 and dx.min() == -4 and dx.max() == 4
    counts = np.zeros([9, 9], int)
    np.add.at(counts, (dy + 4, dx + 4), 1)
    assert counts.min() > 140 and counts.max() < 260     # expected 200, sd ~14


def test_translate_preserves_interior_pixels_exactly():
    images = position_images(200)
    out = augment.translate(images, SEED, shift=4).numpy()
    dy, dx = offsets_of(out)
    for i in range(len(out)):
        rows = slice(max(0, -dy[i]), 16 - max(0, dy[i]))
        cols = slice(max(0, -dx[i]), 16 - max(0, dx[i]))
        src = images[i, rows.start + dy[i]:rows.stop + dy[i], cols.start + dx[i]:cols.stop + dx[i]]
        np.testing.assert_array_equal(out[i, rows, cols], src)


def test_flip_rate_and_per_image_draws():
    images = position_images(4000)
    out = augment.flip_lr(images, SEED).numpy()
    flipped = out[:, 0, 0, 0] == 15
    kept = out[:, 0, 0, 0] == 0
    assert np.all(flipped | kept)
    np.testing.assert_array_equal(out[flipped], images[flipped][:, :, ::-1])
    assert 0.46 < flipped.mean() < 0.54


def test_augment_flip_off_never_mirrors():
    out = augment.augment(position_images(500), SEED, flip=False).numpy()
    assert np.all(out[:, 4, 5, 0] - out[:, 4, 4, 0] == 1)
    out = augment.augment(position_images(500), SEED, flip=True).numpy()
    mirrored = out[:, 4, 5, 0] - out[:, 4, 4, 0] == -1
    assert 0.4 < mirrored.mean() < 0.6


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int32])
def test_dtype_and_shape_preserved(dtype):
    images = position_images(8, size=12, channels=3).astype(dtype)
    for op in (augment.flip_lr, augment.translate, augment.augment):
        out = op(images, SEED)
        assert out.dtype == tf.as_dtype(dtype) and out.shape == images.shape
    single = augment.augment(images[0], SEED)
    assert single.shape == images[0].shape


def test_same_seed_same_result_eager_function_and_tf_data(rng):
    images = rng.randint(0, 256, size=[32, 12, 12, 3]).astype(np.uint8)
    for op in (augment.flip_lr, augment.translate, augment.augment):
        eager = op(images, SEED).numpy()
        in_function = tf.function(op)(tf.constant(images), SEED).numpy()
        ds = tf.data.Dataset.from_tensors((images, SEED)).map(op).with_options(test_options())
        in_data = next(iter(ds)).numpy()
        np.testing.assert_array_equal(eager, in_function)
        np.testing.assert_array_equal(eager, in_data)
        other = op(images, tf.constant([7, 12], tf.int64)).numpy()
        assert not np.array_equal(eager, other)


def test_to_float_range():
    out = augment.to_float(np.array([0, 255], np.uint8)).numpy()
    np.testing.assert_allclose(out, [-1.0, 1.0])
    assert augment.to_float(np.uint8(51)).numpy() == pytest.approx(51 * 2 / 255 - 1)


def test_shift_larger_than_image_rejected():
    with pytest.raises(ValueError, match="shift=4"):
        augment.translate(np.zeros([2, 4, 4, 1], np.uint8), SEED, shift=4)


# ---------------------------------------------------------------------------------------------
# Training views by name: weak, strong (FixMatch's RandAugment + Cutout), none

def ra(images, op, level, sign=1.0):
    """augment.apply_ra_ops with one op at one level for every image, as numpy float."""
    images = np.asarray(images, np.float32)
    n = len(images)
    return augment.apply_ra_ops(images, [augment.RA_OPS.index(op)] * n, [level] * n,
                                [sign] * n).numpy()


@pytest.mark.parametrize("flip,shift", [(True, 4), (False, 4), (True, 2)])
def test_weak_view_is_the_training_augment_bit_for_bit(rng, flip, shift):
    images = rng.randint(0, 256, size=[16, 12, 12, 3]).astype(np.uint8)
    expected = augment.augment(images, SEED, flip=flip, shift=shift).numpy()
    np.testing.assert_array_equal(augment.view("weak", images, SEED, flip, shift).numpy(), expected)


def test_none_view_is_identity(rng):
    images = rng.randint(0, 256, size=[4, 8, 8, 1]).astype(np.uint8)
    np.testing.assert_array_equal(augment.view("none", images, SEED, True, 4).numpy(), images)


def test_unknown_view_is_one_line_naming_the_choices():
    with pytest.raises(augment.UserError) as e:
        augment.check_view("strnog")
    assert str(e.value) == "unknown augmentation 'strnog': use one of weak, strong, none"
    with pytest.raises(augment.UserError, match="use one of weak, strong, none"):
        augment.view("x", np.zeros([1, 8, 8, 3], np.uint8), SEED)


@pytest.mark.parametrize("shape", [(6, 32, 32, 3), (6, 28, 28, 1)])
def test_strong_view_in_tf_data_is_deterministic_and_keeps_shape(rng, shape):
    images = rng.randint(0, 256, size=shape).astype(np.uint8)
    eager = augment.view("strong", images, SEED).numpy()
    assert eager.dtype == np.uint8 and eager.shape == shape
    # Dynamic batch size inside tf.data (graph mode), as the input pipeline calls it.
    ds = (tf.data.Dataset.from_tensor_slices(images).batch(len(images))
          .map(lambda x: augment.view("strong", x, SEED)).with_options(test_options()))
    assert ds.element_spec.shape.as_list() == [None, *shape[1:]]
    np.testing.assert_array_equal(next(iter(ds)).numpy(), eager)
    if shape[-1] == 3:    # unknown height and width (e.g. decoded PNGs): same result
        dynamic = tf.function(lambda x: augment.view("strong", x, SEED),
                              input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        np.testing.assert_array_equal(dynamic(images).numpy(), eager)
    other = augment.view("strong", images, tf.constant([7, 12], tf.int64)).numpy()
    assert not np.array_equal(eager, other)
    assert not np.array_equal(eager, augment.view("weak", images, SEED).numpy())


def test_rand_augment_chooses_ops_per_image(rng):
    """A round leaves an image unchanged when its op is not applied (1/2) or is the identity
    or an enhancement at level 5 (factor 1): 1/2 + 1/2 (1/14 + 4/14 x 1/9) = 0.552; after 2
    rounds 30.4 % (sd 2.3 % over 400 images). One draw per batch would give 0 % or 100 %.
    Pixels in 30..240 of a 32x32 image: autocontrast, solarize and the smallest geometric
    levels all change it."""
    image = rng.randint(30, 241, size=[1, 32, 32, 3]).astype(np.uint8)
    images = np.repeat(image, 400, axis=0)
    out = augment.rand_augment(images, SEED).numpy()
    untouched = np.all(out == images, axis=(1, 2, 3))
    assert 0.21 < untouched.mean() < 0.40, untouched.mean()
    assert len({o.tobytes() for o in out}) > 100    # ops and levels vary across the batch


def test_rand_augment_grey_is_channel_zero_of_its_rgb_tile(rng):
    grey = rng.randint(0, 256, size=[50, 12, 12, 1]).astype(np.uint8)
    tiled = augment.rand_augment(np.tile(grey, [1, 1, 1, 3]), SEED).numpy()
    np.testing.assert_array_equal(tiled[..., 0], tiled[..., 1])
    np.testing.assert_array_equal(tiled[..., 0], tiled[..., 2])
    np.testing.assert_array_equal(augment.rand_augment(grey, SEED).numpy(), tiled[..., :1])


def test_strong_is_weak_then_rand_augment_then_half_size_grey_cutout(rng, monkeypatch):
    images = rng.randint(0, 100, size=[20, 32, 32, 3]).astype(np.uint8)
    monkeypatch.setattr(augment, "rand_augment", lambda x, seed: x)
    out = augment.strong(images, SEED, flip=False, shift=0).numpy()
    grey = np.all(out == 128, axis=-1)
    assert np.all(out[~grey] == images[~grey])
    for box in grey:          # one square of side 16 (centre anywhere), clipped at the borders
        rows, cols = np.nonzero(box.any(axis=1))[0], np.nonzero(box.any(axis=0))[0]
        assert box.sum() == len(rows) * len(cols)
        assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16


def test_ra_levels_of_the_value_ops_match_fixmatch(rng):
    x = rng.randint(0, 256, size=[3, 8, 8, 3]).astype(np.float32)
    # Solarize at level 5: threshold 256 - int(25.6 * 5) = 128; pixels >= 128 inverted.
    np.testing.assert_array_equal(ra(x, "solarize", 5), np.where(x >= 128, 255 - x, x))
    # Posterize at level 5: 4 - int(0.4 * 5) = 2 bits kept.
    np.testing.assert_array_equal(ra(x, "posterize", 5), x.astype(np.uint8) & 0b11000000)
    # Enhancement factor 0.18 m + 0.1: 1 (unchanged) at level 5.
    for op in ("color", "contrast", "brightness", "sharpness"):
        np.testing.assert_allclose(ra(x, op, 5), x, atol=1e-3)
    v = 0.18 * 9 + 0.1                              # 1.72 at level 9
    luma = (x * [0.2989, 0.5870, 0.1140]).sum(-1, keepdims=True)
    np.testing.assert_allclose(ra(x, "color", 9), np.clip(luma + v * (x - luma), 0, 255), atol=1e-2)
    mean = x.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(ra(x, "contrast", 9), np.clip(mean + v * (x - mean), 0, 255), atol=1e-2)
    np.testing.assert_allclose(ra(x, "brightness", 1), np.clip(x + (0.28 - 1) * 127.5, 0, 255), atol=1e-3)


def test_ra_autocontrast_and_equalize_work_per_image():
    low = np.linspace(50, 150, 64, dtype=np.float32).reshape(1, 8, 8, 1).repeat(3, axis=-1)
    full = np.linspace(0, 255, 64, dtype=np.float32).reshape(1, 8, 8, 1).repeat(3, axis=-1)
    pair = np.concatenate([low, full ** 2 / 255])       # the second spans 0..255 unevenly
    out = ra(pair, "autocontrast", 5)
    np.testing.assert_allclose(out[0], (low[0] - 50) * 255 / 100, atol=1e-3)
    np.testing.assert_allclose(out[1], pair[1], atol=1e-3)    # already spans 0..255
    together = ra(pair, "equalize", 5)
    alone = np.concatenate([ra(pair[:1], "equalize", 5), ra(pair[1:], "equalize", 5)])
    np.testing.assert_array_equal(together, alone)
    assert not np.array_equal(together[1], pair[1])


def nearest_affine(image, rows):
    """Independent reference: output (x, y) <- input at round(a x + b y + c, d x + e y + f)."""
    a, b, c, d, e, f = rows
    h, w = image.shape[:2]
    out = np.full_like(image, 128)
    for y in range(h):
        for x in range(w):
            xi, yi = int(np.floor(a * x + b * y + c + 0.5)), int(np.floor(d * x + e * y + f + 0.5))
            if 0 <= xi < w and 0 <= yi < h:
                out[y, x] = image[yi, xi]
    return out


def test_ra_geometric_levels_match_fixmatch(rng):
    x = rng.randint(0, 256, size=[1, 32, 32, 3]).astype(np.float32)    # translate: m pixels at 32
    np.testing.assert_array_equal(ra(x, "translate_x", 3)[0], nearest_affine(x[0], [1, 0, 3, 0, 1, 0]))
    np.testing.assert_array_equal(ra(x, "translate_y", 3, -1.0)[0],
                                  nearest_affine(x[0], [1, 0, 0, 0, 1, -3]))
    np.testing.assert_array_equal(ra(x, "shear_x", 3)[0], nearest_affine(x[0], [1, 0.09, 0, 0, 1, 0]))
    np.testing.assert_array_equal(ra(x, "shear_y", 3, -1.0)[0],
                                  nearest_affine(x[0], [1, 0, 0, -0.09, 1, 0]))
    t = np.deg2rad(9)                           # level 3: int(3 * 30 / 10) degrees
    c, s, m = np.cos(t), np.sin(t), 15.5        # about the centre (15.5, 15.5)
    np.testing.assert_array_equal(ra(x, "rotate", 3)[0],
                                  nearest_affine(x[0], [c, s, m - c * m - s * m, -s, c, m + s * m - c * m]))
