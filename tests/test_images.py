"""libml/data/images.py: every PIL mode, EXIF rotation, shorter-side resize + centre crop, listing,
read summaries and --skip_bad_images."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from libml.data import images
from libml.base.errors import UserError


def save(path, image, fmt=None, **kwargs):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    image.save(str(path), fmt, **kwargs)
    return str(path)


def constant(mode, size, value):
    return Image.new(mode, size, value)


# ---------------------------------------------------------------------------------------------
# Modes: each comes back as 8-bit L or RGB with the values a viewer shows

@pytest.mark.parametrize("mode,fmt,value,expected,channels,tol", [
    ("1", "PNG", 1, 255, 1, 0),
    ("L", "PNG", 200, 200, 1, 0),
    ("L", "BMP", 77, 77, 1, 0),                        # 8-bit grayscale BMP (issue 14 item 7)
    ("LA", "PNG", (90, 255), 90, 1, 0),
    ("I;16", "PNG", 65535, 255, 1, 0),                 # not clipped to white: scaled
    ("I;16", "PNG", 128 * 257, 128, 1, 0),
    ("I;16", "PNG", 1000, 4, 1, 0),                    # round(1000 * 255 / 65535) = 4
    ("RGB", "PNG", (10, 20, 30), (10, 20, 30), 3, 0),
    ("RGBA", "PNG", (10, 20, 30, 255), (10, 20, 30), 3, 0),
    ("RGB", "JPEG", (200, 100, 50), (200, 100, 50), 3, 3),
    ("CMYK", "JPEG", (0, 255, 255, 0), (255, 0, 0), 3, 3),   # pure red in CMYK
    ("RGB", "WEBP", (60, 120, 180), (60, 120, 180), 3, 4),
    ("RGB", "BMP", (1, 2, 3), (1, 2, 3), 3, 0),
    ("RGB", "GIF", (0, 0, 255), (0, 0, 255), 3, 0),    # GIF is palette (P) on disk
    ("RGB", "TIFF", (5, 6, 7), (5, 6, 7), 3, 0),
])
def test_modes_to_8bit(tmp_path, mode, fmt, value, expected, channels, tol):
    path = save(tmp_path / f"x.{fmt.lower()}", constant(mode, (12, 10), value), fmt)
    array = images.load_image(path, 8)
    assert array.dtype == np.uint8 and array.shape == (8, 8, channels)
    np.testing.assert_allclose(array.astype(int), np.broadcast_to(expected, array.shape), atol=tol)


def test_palette_and_transparency_over_white(tmp_path):
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 128, 0] + [0] * 765)
    assert np.all(images.load_image(save(tmp_path / "p.png", p), 8) == [0, 128, 0])
    p.info["transparency"] = 0
    assert np.all(images.load_image(save(tmp_path / "pt.png", p, transparency=0), 8) == 255)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))           # fully transparent red
    assert np.all(images.load_image(save(tmp_path / "t.png", rgba), 8) == 255)
    half = Image.new("RGBA", (8, 8), (255, 0, 0, 128))         # red at alpha 128 over white
    np.testing.assert_allclose(images.load_image(save(tmp_path / "h.png", half), 8)[0, 0],
                               [255, 127, 127], atol=1)


def test_float_mode(tmp_path):
    unit = Image.fromarray(np.full((8, 8), 0.5, np.float32))    # mode F in [0, 1]
    assert images.to_8bit(unit).mode == "L" and np.all(np.asarray(images.to_8bit(unit)) == 128)
    big = Image.fromarray(np.full((8, 8), 300.0, np.float32))
    assert np.all(np.asarray(images.to_8bit(big)) == 255)


def test_channels_forced():
    gray = Image.new("L", (8, 8), 40)
    buf = io.BytesIO()
    gray.save(buf, "PNG")
    buf.seek(0)
    three = images.load_image(buf, 8, channels=3)
    assert three.shape == (8, 8, 3) and np.all(three == 40)
    colour = Image.new("RGB", (8, 8), (255, 0, 0))
    buf = io.BytesIO()
    colour.save(buf, "PNG")
    buf.seek(0)
    one = images.load_image(buf, 8, channels=1)
    assert one.shape == (8, 8, 1) and np.all(one == 76)           # 0.299 * 255 (ITU-R 601-2)


# ---------------------------------------------------------------------------------------------
# Geometry

def test_shorter_side_resize_then_centre_crop(tmp_path):
    """64x32: black 8-px bands at both ends, white between. Size 16: the shorter side becomes
    16, the width 32, and the centre 16 columns come from the white middle only."""
    a = np.zeros((32, 64), np.uint8)
    a[:, 8:56] = 255
    out = images.load_image(save(tmp_path / "wide.png", Image.fromarray(a)), 16)
    assert out.shape == (16, 16, 1) and np.all(out == 255)
    squashed = np.asarray(Image.fromarray(a).resize((16, 16), Image.BILINEAR))  # old predict
    assert squashed[:, 0].max() < 128


def test_exif_rotation(tmp_path):
    """Orientation 6 (camera turned clockwise): a 64x32 file shown as 32 wide, 64 high."""
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32, 0] = 255                          # left half red on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path / "rot.png", Image.fromarray(a), exif=exif)
    upright = np.rot90(a, k=-1)                 # 90 degrees clockwise: red goes to the top
    expected = images.load_image(save(tmp_path / "upright.png", Image.fromarray(upright.copy())), 16)
    got = images.load_image(path, 16)
    np.testing.assert_array_equal(got, expected)
    assert got[0, :, 0].min() == 255 and got[-1, :, 0].max() == 0


# ---------------------------------------------------------------------------------------------
# Listing, summaries, bad files

@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    save(root / "a.png", constant("L", (8, 8), 1))
    save(root / "sub" / "deeper" / "b.BMP", constant("L", (8, 8), 2), "BMP")
    save(root / "c.webp", constant("RGB", (8, 8), (3, 3, 3)), "WEBP")
    (root / "notes.txt").write_text("x")
    (root / "bad.png").write_bytes(b"\x89PNG not really")
    (root / ".hidden.png").write_bytes(b"junk")
    return root


def test_list_images_recursive_and_counted(folder):
    summary = images.ReadSummary()
    found = images.list_images(str(folder), summary)
    assert [os.path.relpath(p, folder) for p in found] == ["a.png", "bad.png", "c.webp",
                                                           os.path.join("sub", "deeper", "b.BMP")]
    assert summary.not_images == {".txt": 1}


def test_bad_file_stops_with_one_line_or_is_skipped(folder):
    paths = images.list_images(str(folder))
    with pytest.raises(UserError, match=r"unreadable image .*bad\.png .*--skip_bad_images"):
        images.load_images(paths, 8)
    summary = images.ReadSummary(not_images={".txt": 1})
    arrays, kept, summary = images.load_images(paths, 8, skip_bad=True, summary=summary)
    assert kept == [0, 2, 3] and len(arrays) == 3
    assert [p for p, _ in summary.bad] == [paths[1]] and "UnidentifiedImageError" in summary.bad[0][1]
    assert str(folder) not in summary.bad[0][1]           # the path is not repeated in the reason
    assert summary.line() == ("read 3 images; skipped 2: 1 not PNG, JPEG, BMP, GIF, WebP, TIFF "
                              "(.txt 1), 1 unreadable")
    assert summary.lines()[1].startswith(f"  unreadable {paths[1]}: ")


def test_find_images_files_folders_patterns(folder):
    one = str(folder / "a.png")
    assert images.find_images([one]) == [(one, one)]
    bmp = str(folder / "sub" / "deeper" / "b.BMP")
    found = images.find_images([str(folder / "**" / "*.BMP"), str(folder)])   # duplicates once
    assert [shown for _, shown in found] == [bmp, "a.png", "bad.png", "c.webp"]
    names = [shown for _, shown in images.find_images([str(folder)])]
    assert names == ["a.png", "bad.png", "c.webp", os.path.join("sub", "deeper", "b.BMP")]
    pattern = [shown for _, shown in images.find_images([str(folder / "*.png")])]
    assert pattern == [str(folder / "a.png"), str(folder / "bad.png")]
    with pytest.raises(UserError, match="no such file, folder or matching file"):
        images.find_images([str(folder / "missing*.jpg")])
    with pytest.raises(UserError, match=r"no images in .*notes.txt \(only other files: .txt 1\): pass PNG"):
        images.find_images([str(folder / "notes.txt")])
    with pytest.raises(UserError, match="no --images given"):
        images.find_images([])
