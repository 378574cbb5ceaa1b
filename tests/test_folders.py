"""Class-per-folder trees: resizing, image modes, bad files (reading itself: tests/test_data.py)."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from eejax import folders
from eejax.errors import UserError


def test_resize_matches_pil_and_leaves_the_right_size_alone():
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  assert folders.resize(images, None) is images and folders.resize(images, 8) is images
  got = folders.resize(images, 4)
  want = np.stack([np.asarray(Image.fromarray(im).resize((4, 4), Image.BILINEAR)) for im in images])
  np.testing.assert_array_equal(got, want)


def _tree_with(tmp_path, extra):
  """A two-class tree of 4x4 RGB PNGs per class and split; `extra(train_cat_folder)` adds more files."""
  for split in ("train", "test"):
    for i, cls in enumerate(("cat", "dog")):
      folder = tmp_path / split / cls
      folder.mkdir(parents=True)
      for j in range(2):
        Image.fromarray(np.full((4, 4, 3), 50 * i + j, np.uint8)).save(folder / f"{j}.png")
  extra(tmp_path / "train" / "cat")
  return str(tmp_path)


def test_every_image_mode_decodes_as_an_independent_reference_says(tmp_path):
  rng = np.random.default_rng(0)
  grey16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
  Image.fromarray(grey16).save(tmp_path / "g16.png")  # PIL opens it as I;16
  want = {"g16.png": np.repeat(np.round(grey16 / 257.0).astype(np.uint8)[..., None], 3, -1)}
  index = rng.integers(0, 4, (5, 7), dtype=np.uint8)
  palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
  p = Image.fromarray(index, "P")
  p.putpalette(palette.ravel().tolist())
  p.info["transparency"] = 2
  p.save(tmp_path / "p.png", transparency=2)
  want["p.png"] = palette[index]
  rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  want["rgba.png"] = rgba[..., :3]
  cmyk = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
  Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tiff")
  c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
  want["cmyk.tiff"] = (255 - c) * (255 - k) / 255
  la = rng.integers(0, 256, (5, 7, 2), dtype=np.uint8)
  Image.fromarray(la, "LA").save(tmp_path / "la.png")
  want["la.png"] = np.repeat(la[..., :1], 3, -1)
  bits = rng.integers(0, 2, (5, 7)).astype(bool)
  Image.fromarray(bits).save(tmp_path / "bw.png")
  want["bw.png"] = np.repeat((bits * 255).astype(np.uint8)[..., None], 3, -1)
  for name, expected in want.items():
    got = folders.decode(str(tmp_path / name), None)
    assert got.dtype == np.uint8 and got.shape == (5, 7, 3), name
    np.testing.assert_allclose(got, expected, atol=1, err_msg=name)  # CMYK: PIL rounds the product


def test_bad_files_are_left_out_with_one_warning_that_names_them(tmp_path, capsys):
  def add_bad(folder):
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    good = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(good, "PNG")
    (folder / "truncated.png").write_bytes(good.getvalue()[:40])
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(jpeg, "JPEG")
    (folder / "corrupt.jpg").write_bytes(jpeg.getvalue()[:20] + b"\x00" * 50)
    os.symlink(folder / "gone.png", folder / "dangling.png")
    if os.geteuid() != 0:  # root reads any file: no unreadable one can be made
      Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "locked.png")
      os.chmod(folder / "locked.png", 0)
  root = _tree_with(tmp_path, add_bad)
  splits, names = folders.read_tree(root, None)
  assert names == ("cat", "dog")
  images, labels = splits["train"]
  assert images.shape == (4, 4, 4, 3) and labels.tolist() == [0, 0, 1, 1]  # only the good ones
  err = capsys.readouterr().err
  bad = 5 if os.geteuid() == 0 else 6
  assert f"warning: {bad} of {4 + bad} files under" in err, err
  for name in ("empty.png", "text.jpg", "truncated.png", "corrupt.jpg", "dangling.png"):
    assert name in err, (name, err)
  assert "a link to nothing" in err


def test_tree_mistakes_are_one_line(tmp_path):
  root = _tree_with(tmp_path / "a", lambda folder: None)
  (tmp_path / "a" / "test" / "bird").mkdir()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a" / "test" / "bird" / "0.png")
  with pytest.raises(UserError, match=r"class folder\(s\) bird in .*test are not in .*train"):
    folders.read_tree(root, None)
  flat = tmp_path / "b"
  (flat / "train").mkdir(parents=True)
  (flat / "test").mkdir()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(flat / "train" / "0.png")
  with pytest.raises(UserError, match="holds no class folders but image files directly in it"):
    folders.read_tree(str(flat), None)
  only_bad = _tree_with(tmp_path / "c", lambda folder: None)
  for path in folders.images_under(os.path.join(only_bad, "test")):
    with open(path, "wb") as f:
      f.write(b"x")
  with pytest.raises(UserError, match="no image under .*test could be decoded"):
    folders.read_tree(only_bad, None)
