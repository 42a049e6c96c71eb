"""The offline dataset of the examples: scikit-learn's handwritten digits.

``load_digits`` ships inside scikit-learn (1,797 8x8 images, 10 classes), so
nothing is downloaded.  Without scikit-learn the examples fall back to a
synthetic 10-class problem of the same shape, and say so.
"""
import numpy as np


def load_dataset(seed=0):
    """(x_train, y_train, x_test, y_test, name): images (N, 1, 8, 8) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        name = "synthetic digits (scikit-learn not installed: pip install scikit-learn)"
        centers = rng.random((10, 64))
        labels = rng.integers(0, 10, 1797)
        images = centers[labels] + 0.25 * rng.standard_normal((1797, 64))
    else:
        name = "scikit-learn load_digits (1,797 8x8 handwritten digits)"
        digits = load_digits()
        images, labels = digits.data / 16.0, digits.target
    order = rng.permutation(len(labels))
    images = images[order].reshape(-1, 1, 8, 8).astype(np.float32)
    labels = labels[order].astype(np.int64)
    split = int(0.8 * len(labels))
    return images[:split], labels[:split], images[split:], labels[split:], name


def uneven_shard(n, rank, size):
    """(start, stop) of rank's slice of n items; rank r gets a share proportional to r + 1."""
    cuts = np.round(np.cumsum(np.arange(1, size + 1)) / (size * (size + 1) / 2) * n)
    cuts = np.concatenate([[0], cuts]).astype(int)
    return int(cuts[rank]), int(cuts[rank + 1])
