import pytest
import torch
import torch.nn.functional as F

from monai_mlbseg.transforms import StrongIntensityAugment


def _images(shape=(6, 1, 12, 12)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def test_scale_and_shift_are_per_image_and_within_their_ranges():
    x = _images()
    augment = StrongIntensityAugment(contrast=0.3, shift=0.2, noise_std=0.0, blur_prob=0.0).set_random_state(1)
    y = augment(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    for i in range(x.shape[0]):
        # y = a x + b exactly: fit a and b from two pixels, check every other
        a = float((y[i].flatten()[1] - y[i].flatten()[0]) / (x[i].flatten()[1] - x[i].flatten()[0]))
        b = float(y[i].flatten()[0] - a * x[i].flatten()[0])
        torch.testing.assert_close(y[i], a * x[i] + b, rtol=1e-5, atol=1e-5)
        assert 0.7 <= a <= 1.3 and -0.2 <= b <= 0.2
        assert a == pytest.approx(augment.scale[i], rel=1e-5) and b == pytest.approx(augment.offset[i], abs=1e-5)
    assert len(set(augment.scale.round(6))) == x.shape[0], "drawn independently per image"


def test_blur_is_a_three_pixel_box_on_the_chosen_images():
    for dims in (2, 3):
        x = _images((4, 1) + (8,) * dims)
        augment = StrongIntensityAugment(contrast=0.0, shift=0.0, noise_std=0.0, blur_prob=1.0)
        pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
        torch.testing.assert_close(augment(x), pool(x, 3, stride=1, padding=1, count_include_pad=False))
    half = StrongIntensityAugment(contrast=0.0, shift=0.0, noise_std=0.0, blur_prob=0.5).set_random_state(0)
    x = _images((40, 1, 8, 8))
    y = half(x)
    blurred = [not torch.equal(y[i], x[i]) for i in range(40)]
    assert blurred == list(half.blur) and 5 < sum(blurred) < 35


def test_noise_std_reproducibility_and_reuse():
    x = torch.zeros(8, 1, 32, 32)
    augment = StrongIntensityAugment(contrast=0.0, shift=0.0, noise_std=0.1, blur_prob=0.0).set_random_state(5)
    y = augment(x)
    assert float(y.std()) == pytest.approx(0.1, rel=0.05) and abs(float(y.mean())) < 0.01
    torch.testing.assert_close(augment(x, randomize=False), y)
    assert not torch.equal(augment(x), y)
    again = StrongIntensityAugment(contrast=0.0, shift=0.0, noise_std=0.1, blur_prob=0.0).set_random_state(5)
    torch.testing.assert_close(again(x), y)


@pytest.mark.parametrize(
    "kwargs", [{"contrast": 1.0}, {"contrast": -0.1}, {"shift": -1}, {"noise_std": -0.1}, {"blur_prob": 1.5}]
)
def test_bad_ranges_are_refused(kwargs):
    with pytest.raises(ValueError, match="StrongIntensityAugment needs"):
        StrongIntensityAugment(**kwargs)


def test_bad_shapes_are_refused():
    augment = StrongIntensityAugment()
    with pytest.raises(ValueError, match=r"expects \[N, C, \*S\], 2 or 3 spatial dims; got \(1, 8, 8\)"):
        augment(torch.rand(1, 8, 8))
    augment(torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match="drawn are for 3 images, got 2"):
        augment(torch.rand(2, 1, 8, 8), randomize=False)
