"""DataLoader workers started with `spawn` (macOS, Windows, Python >= 3.14) get the dataset pickled: it must
carry the memory maps' paths, not their contents, and give the same batches as the main process."""
import pickle

import numpy as np
import torch

from offroad.augment import build_augment
from offroad.data import SegmentationDataset
from offroad.runtime import Run
from offroad.training import augmented_loader
from tests.conftest import make_params


def test_pickled_dataset_holds_paths_not_pixels(tiny_dataset):
    params = make_params()
    dataset = SegmentationDataset(tiny_dataset.train, build_augment(params.augment, 255), seed=3)
    blob = pickle.dumps(dataset)
    assert tiny_dataset.train.images.nbytes > 100_000
    assert len(blob) < 100_000  # the real train split (1.45 GB of pixels) pickles to the same few kB
    copy = pickle.loads(blob)
    assert isinstance(copy.split.images, np.memmap)
    np.testing.assert_array_equal(copy.split.images, tiny_dataset.train.images)
    for key in [(0, 1), (4, 2)]:
        a, b = dataset[key], copy[key]
        assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2]))


def test_two_spawned_persistent_workers_give_the_batches_of_the_main_process(tiny_dataset):
    params = make_params()
    dataset = SegmentationDataset(tiny_dataset.train, build_augment(params.augment, 255), seed=0)
    run = Run(torch.device("cpu"), False, 10, 255)
    epochs = [[[(e, 4), (e, 0)], [(e, 5), (e, 2)], [(e, 1)]] for e in range(2)]

    def batches(loader):
        out = []
        for keys in epochs:
            loader.batch_sampler.batches = keys
            out += [(images, masks, index) for images, masks, index in loader]
        return out

    plain = batches(augmented_loader(dataset, 0, run))
    spawned_loader = augmented_loader(dataset, 2, run, context="spawn")
    spawned = batches(spawned_loader)
    assert len(plain) == len(spawned) == 6
    for (ia, ma, xa), (ib, mb, xb) in zip(plain, spawned):
        assert torch.equal(ia, ib) and torch.equal(ma, mb) and torch.equal(xa, xb)
    assert not torch.equal(plain[0][0], plain[3][0])  # epoch 1 augments image 4 differently from epoch 0
    assert spawned_loader._iterator is not None and spawned_loader._iterator._persistent_workers
