import io

import numpy as np
import pytest
import torch
from PIL import Image

from mrnet_core.images import ImageError, decode, read_image, resize_long_side, save_png


def encoded(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_and_grey_read_as_floats(samples):
    rgb, notes = read_image(samples / "astronaut.png")
    assert rgb.shape == (3, 512, 512) and rgb.dtype == torch.float32 and notes == []
    assert 0 <= rgb.min() and rgb.max() <= 1
    grey, _ = read_image(samples / "camera.png")
    assert grey.shape == (1, 512, 512)


@pytest.mark.parametrize(
    "im,channels,note",
    [
        (Image.new("RGBA", (4, 3), (255, 0, 0, 0)), 3, "alpha composited on white"),
        (Image.new("LA", (4, 3), (10, 128)), 1, "alpha composited on white"),
        (Image.new("P", (4, 3), 5), 3, "palette expanded"),
        (Image.new("CMYK", (4, 3), (0, 255, 0, 0)), 3, "CMYK converted to RGB"),
        (Image.new("1", (4, 3), 1), 1, "1-bit expanded to grey"),
    ],
)
def test_odd_modes_are_converted_and_say_so(im, channels, note):
    image, notes = decode(encoded(im, "TIFF" if im.mode == "CMYK" else "PNG"), "x")
    assert image.shape == (channels, 3, 4)
    assert note in notes


def test_transparent_pixels_become_white():
    image, _ = decode(encoded(Image.new("RGBA", (2, 2), (255, 0, 0, 0))))
    assert torch.allclose(image, torch.ones_like(image))


def test_sixteen_bit_keeps_its_precision():
    a = np.array([[0, 1000, 65535]], dtype=np.uint16)
    image, notes = decode(encoded(Image.fromarray(a)))
    assert image.shape == (1, 1, 3)
    assert torch.allclose(image[0, 0], torch.tensor([0, 1000 / 65535, 1.0]), atol=1e-6)
    assert any("scaled from 0..65535" in n for n in notes)


def test_exif_orientation_is_honoured():
    im = Image.new("RGB", (4, 2), (0, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image, notes = decode(encoded(im, "JPEG", exif=exif))
    assert image.shape == (3, 4, 2)
    assert "rotated by EXIF orientation" in notes


def test_animation_keeps_the_first_frame():
    frames = [Image.new("L", (3, 3), v) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    image, notes = decode(buf.getvalue())
    assert "first of 2 frames" in notes and image.max() < 0.01


@pytest.mark.parametrize(
    "data,kind,reason",
    [
        (b"", "empty", "empty file"),
        (b"this is text with a .png name", "not_an_image", "not an image"),
        (encoded(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "corrupt", "truncated"),
    ],
)
def test_bad_bytes_raise_an_error_naming_the_file(tmp_path, data, kind, reason):
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=reason) as e:
        read_image(path)
    assert str(path) in str(e.value) and e.value.kind == kind


def test_pixel_limit_and_missing_files(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(encoded(Image.new("L", (100, 100))))
    with pytest.raises(ImageError, match="over the limit of 5000 pixels"):
        read_image(path, max_pixels=5000)
    with pytest.raises(ImageError, match="cannot read"):
        read_image(tmp_path / "missing.png")


def test_resize_long_side_and_png_round_trip(tmp_path):
    image = torch.rand(3, 40, 20)
    small = resize_long_side(image, 10)
    assert small.shape == (3, 10, 5)
    save_png(small, tmp_path / "s.png")
    back, _ = read_image(tmp_path / "s.png")
    assert torch.allclose(back, small, atol=1 / 255)
