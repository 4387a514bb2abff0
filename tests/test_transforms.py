"""data.transforms: per-model preprocessing equals the model's own transform (open_clip's, ALBEF's)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from mcad_cache.constants import ALBEF_MEAN, ALBEF_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mcad_cache.data.transforms import make_image_transform, validate_preprocess_cfg


def _image(width: int, height: int) -> Image.Image:
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    arr = (0.5 * noise + 0.5 * ramp).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def _cfg(size, mode, interp="bicubic", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    return {
        "image_size": size,
        "resize_mode": mode,
        "crop": None if mode == "squash" else "center",
        "interpolation": interp,
        "mean": list(mean),
        "std": list(std),
    }


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
@pytest.mark.parametrize("wh", [(53, 37), (30, 61), (40, 40)])
def test_matches_open_clip_transform(mode, interp, wh):
    img = _image(*wh)
    ours = make_image_transform(_cfg(32, mode, interp))(img)
    ref = image_transform(32, is_train=False, resize_mode=mode, interpolation=interp)(img)
    assert ours.dtype == torch.float32
    assert ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
def test_matches_open_clip_non_square_target(mode):
    img = _image(57, 41)
    ours = make_image_transform(_cfg([24, 36], mode))(img)
    ref = image_transform((24, 36), is_train=False, resize_mode=mode)(img)
    assert ours.shape == (3, 24, 36)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_matches_albef_test_transform():
    # salesforce/ALBEF dataset/__init__.py test_transform.
    res = 48
    img = _image(61, 35)
    ref = T.Compose(
        [
            T.Resize((res, res), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(ALBEF_MEAN, ALBEF_STD),
        ]
    )(img)
    ours = make_image_transform(_cfg(res, "squash", mean=ALBEF_MEAN, std=ALBEF_STD))(img)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_normalisation_known_values():
    # A constant grey image: every pixel (v / 255 - mean) / std exactly.
    img = Image.new("RGB", (20, 10), (128, 64, 255))
    out = make_image_transform(_cfg(8, "squash", mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 1.0)))(img)
    expected = torch.tensor([(128 / 255 - 0.5) / 0.5, (64 / 255 - 0.25) / 0.5, 1.0])
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, rtol=0, atol=1e-6)
    assert float(out.std(dim=(1, 2)).max()) < 1e-6


def test_longest_pads_with_fill():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    out = make_image_transform({**_cfg(16, "longest", mean=(0, 0, 0), std=(1, 1, 1)), "fill": 0})(img)
    # 40x20 -> 16x8, padded by 4 rows top and bottom with 0.
    assert out.shape == (3, 16, 16)
    assert float(out[:, :4].abs().max()) == 0.0
    assert float(out[:, 4:12].min()) == pytest.approx(1.0)


def test_picklable_for_dataloader_workers():
    fn = make_image_transform(_cfg(16, "shortest"))
    fn2 = pickle.loads(pickle.dumps(fn))
    img = _image(30, 20)
    torch.testing.assert_close(fn(img), fn2(img), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"resize_mode": "crop"}, "resize_mode"),
        ({"interpolation": "lanczos"}, "interpolation"),
        ({"crop": None}, "crop"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_invalid_cfg_rejected(patch, match):
    with pytest.raises(ValueError, match=match):
        make_image_transform({**_cfg(16, "shortest"), **patch})


def test_missing_key_and_non_rgb_rejected():
    cfg = _cfg(16, "squash")
    del cfg["std"]
    with pytest.raises(ValueError, match="std"):
        validate_preprocess_cfg(cfg)
    with pytest.raises(ValueError, match="RGB"):
        make_image_transform(_cfg(16, "squash"))(Image.new("RGBA", (8, 8)))
