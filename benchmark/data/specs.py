"""Dataset specs.  Every image is float32 in [0, 1], shape (N, C, H, W); labels int64.

A spec knows its shape, class count, a sensible default model and threat model, and how
to load the arrays (from a bundled copy, a Debian package or ``--data-dir``).  A missing
or corrupt dataset raises :class:`~cfbench.errors.DatasetError` saying how to get it.
"""

from __future__ import annotations

import numpy as np

from . import formats
from .base import ArrayDataset, DatasetSpec

__all__ = ["ArrayDataset", "DatasetSpec", "Digits", "FashionMNIST", "MNIST", "CIFAR10", "CIFAR100"]


class Digits(DatasetSpec):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), split 1,297 / 500 (seeded)."""

    name = "digits"
    description = "scikit-learn's bundled 8x8 digits (1,797 images; fixed 1,297/500 train/test split)"
    shape = (1, 8, 8)
    default_model = "cnn8"
    default_eps = 0.1
    default_eps_l2 = 0.5
    augmentation = "shift"
    default_epochs = 30
    default_batch_size = 64
    default_lr = 0.05
    #: sized so that the demo (``cfbench run --defense pgd-at --dataset digits``: training,
    #: AutoAttack and membership inference with reference models) takes a few minutes on two
    #: CPU cores: AutoAttack on 200 of the 500 test images (+-6 points at 95%), 4 reference
    #: models (2 IN / 2 OUT per example; RMIA and fixed-variance LiRA are designed for so few)
    default_evaluator_settings = {"autoattack.n_examples": 200, "mia.reference_models": 4}
    how_to_get = "it ships with scikit-learn (pip install scikit-learn)."
    #: the train/test split of digits is fixed by this seed (the set has no official split)
    split_seed = 0
    n_test = 500

    def load(self, data_dir=None, download=False) -> ArrayDataset:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
        y = d.target.astype(np.int64)
        perm = np.random.default_rng(self.split_seed).permutation(len(x))
        test, train = perm[: self.n_test], perm[self.n_test:]
        return ArrayDataset(self.name, x[train], y[train], x[test], y[test], 10,
                            [str(i) for i in range(10)], "sklearn.datasets.load_digits")


class FashionMNIST(DatasetSpec):
    """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 greyscale, from IDX files."""

    name = "fashion-mnist"
    description = "Fashion-MNIST 28x28 (60k/10k) from the Debian package dataset-fashion-mnist or --data-dir"
    shape = (1, 28, 28)
    default_model = "cnn28"
    default_eps = 0.1
    default_eps_l2 = 1.5
    augmentation = "shift"
    default_epochs = 15
    how_to_get = ("install the Debian package: `apt-get install dataset-fashion-mnist` (it puts the IDX "
                  "files in /usr/share/datasets/fashion-mnist), or pass --data-dir DIR with "
                  "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] "
                  "and t10k-labels-idx1-ubyte[.gz].")
    class_names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]

    def load(self, data_dir=None, download=False) -> ArrayDataset:
        return formats.load_mnist_like(self, data_dir, download)


class MNIST(DatasetSpec):
    """MNIST (LeCun et al.): 60k/10k 28x28 greyscale, from IDX files in --data-dir."""

    name = "mnist"
    description = "MNIST 28x28 (60k/10k) from IDX files in --data-dir"
    shape = (1, 28, 28)
    default_model = "cnn28"
    default_eps = 0.3
    default_eps_l2 = 2.0
    augmentation = "shift"
    default_epochs = 10
    #: the literature's MNIST attack settings (Linf eps = 0.3): Madry et al. (2018)'s MNIST challenge
    #: trains with 40 PGD steps of 0.01 from a random start; TRADES' reference script
    #: (yaodongyu/TRADES, train_trades_mnist.py) uses 40 steps of 0.01 and beta = 1.0
    default_defense_settings = {"pgd-at": {"steps": 40, "step_size": 0.01},
                                "trades": {"steps": 40, "step_size": 0.01, "beta": 1.0}}
    #: ... and evaluates with PGD-40 of 0.01 (train_trades_mnist.py's eval_adv_test_whitebox)
    default_evaluator_settings = {"pgd.steps": 40, "pgd.step_size": 0.01}
    how_to_get = ("pass --data-dir DIR containing train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                  "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] (the original IDX files), "
                  "or add --download if torchvision is installed.")
    class_names = [str(i) for i in range(10)]

    def load(self, data_dir=None, download=False) -> ArrayDataset:
        return formats.load_mnist_like(self, data_dir, download)


class CIFAR10(DatasetSpec):
    """CIFAR-10 (Krizhevsky 2009): 50k/10k 32x32 colour, from cifar-10-batches-py."""

    name = "cifar10"
    description = "CIFAR-10 32x32 (50k/10k) from cifar-10-batches-py in --data-dir"
    shape = (3, 32, 32)
    num_classes = 10
    default_model = "preact-resnet18"
    default_eps = 8 / 255
    default_eps_l2 = 0.5
    augmentation = "flip-shift"
    default_epochs = 30
    default_lr = 0.1
    #: the literature's CIFAR-10 attack settings (Linf eps = 8/255): Madry et al. (2018)'s
    #: cifar10_challenge trains with 7 PGD steps of 2/255; TRADES' CIFAR-10 script uses 10 steps
    #: of 0.007 and beta = 6.0 (cfbench's default beta already)
    default_defense_settings = {"pgd-at": {"steps": 7, "step_size": 2 / 255},
                                "trades": {"steps": 10, "step_size": 0.007, "beta": 6.0}}
    how_to_get = ("pass --data-dir DIR containing the extracted `cifar-10-batches-py` folder (from "
                  "cifar-10-python.tar.gz), or add --download if torchvision is installed.")
    class_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def load(self, data_dir=None, download=False) -> ArrayDataset:
        return formats.load_cifar(self, data_dir, download)


class CIFAR100(CIFAR10):
    """CIFAR-100 (Krizhevsky 2009): 50k/10k 32x32 colour, 100 fine classes, from cifar-100-python."""

    name = "cifar100"
    description = "CIFAR-100 32x32 (50k/10k, 100 classes) from cifar-100-python in --data-dir"
    num_classes = 100
    how_to_get = ("pass --data-dir DIR containing the extracted `cifar-100-python` folder (from "
                  "cifar-100-python.tar.gz), or add --download if torchvision is installed.")
    class_names = []  # read from the meta file
