from pathlib import Path

import pytest
import torch

from mrnet_core.images import read_image, resize_long_side

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="session")
def samples():
    return SAMPLES


def sample(name, size):
    """A bundled sample photo, resized so that its long side is `size`: [C, H, W] in [0, 1]."""
    image, _ = read_image(SAMPLES / name)
    return resize_long_side(image, size)


@pytest.fixture
def astronaut64():
    return sample("astronaut.png", 64)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
