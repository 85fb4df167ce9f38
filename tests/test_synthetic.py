import hashlib

import numpy as np

from saev_core.steps import synthetic


def digest(dpath):
    return {
        p.relative_to(dpath).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(dpath.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path):
    synthetic.generate(tmp_path / "a", 12, 64, seed=3)
    synthetic.generate(tmp_path / "b", 12, 64, seed=3)
    synthetic.generate(tmp_path / "c", 12, 64, seed=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_masks_mark_planted_colours():
    img, mask = synthetic.make_image(index=5, size=64, seed=0)
    assert img.shape == (64, 64, 3) and mask.shape == (64, 64)
    planted = set(np.unique(mask)) - {0}
    assert planted, "every image plants at least one concept"
    red = synthetic.CONCEPTS.index("red circle")
    for i in range(50):
        img, mask = synthetic.make_image(i, 64, seed=0)
        if (mask == red).sum() > 50:
            mean_rgb = img[mask == red].mean(axis=0)
            assert mean_rgb[0] > 150 and mean_rgb[1] < 90 and mean_rgb[2] < 90
            break
    else:
        raise AssertionError("no red circle in 50 images")
