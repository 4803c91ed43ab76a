"""Augment (spec §4): flip p=0.5 and reflect-pad-4 translation, per image, stateless."""
import numpy as np
import pytest
import tensorflow as tf

from libml import augment
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
