"""Class-per-folder trees: the decoding progress line and resizing (reading itself: tests/test_data.py)."""
import io

import numpy as np
from PIL import Image

from eejax import folders


def test_decoding_prints_progress_with_an_eta_and_a_total():
  out = io.StringIO()
  count = folders.Count("decoding t/train", 12, every_s=0.0, stream=out)
  for i in range(12):
    assert count.tick(i) == i
  count.close()
  lines = out.getvalue().splitlines()
  assert lines[0].startswith("decoding t/train: 1 of 12 images (8%) ETA ")
  assert lines[-2].startswith("decoding t/train: 12 of 12 images (100%)")
  assert lines[-1].startswith("decoding t/train: 12 images in ")


def test_resize_matches_pil_and_leaves_the_right_size_alone():
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  assert folders.resize(images, None) is images and folders.resize(images, 8) is images
  got = folders.resize(images, 4)
  want = np.stack([np.asarray(Image.fromarray(im).resize((4, 4), Image.BILINEAR)) for im in images])
  np.testing.assert_array_equal(got, want)
