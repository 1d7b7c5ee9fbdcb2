"""The scoring minibatch read from the real CIFAR-10 tar."""
import torch

from blockswap_plugin.timm.data import count_classes, load_minibatch, open_image_dataset


def test_minibatch_from_opened_dataset_matches(cifar_train):
    # The command line opens the tar once to count classes and hands the dataset on.
    fresh_images, fresh_labels, fresh_classes = load_minibatch(str(cifar_train), 16, seed=5)
    dataset = open_image_dataset(str(cifar_train))
    assert count_classes(dataset) == 10
    images, labels, classes = load_minibatch(str(cifar_train), 16, seed=5, dataset=dataset)
    assert torch.equal(images, fresh_images)
    assert torch.equal(labels, fresh_labels)
    assert classes == fresh_classes
    assert classes == 10
    assert dataset.transform is not None
