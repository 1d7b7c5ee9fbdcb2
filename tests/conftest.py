"""Shared fixtures: paths to the real data in ../shared/data and a real CIFAR-10 minibatch."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
CIFAR_TRAIN = DATA / "cifar10" / "train.tar"
CIFAR_TEST = DATA / "cifar10" / "test.tar"
COCO128 = DATA / "coco128"
PAPER_GENOTYPES = SHARED / "reference" / "paper_genotypes.json"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of more than about a minute")


def require(path: Path) -> Path:
    """Skip the test with a clear message when a shared data file is absent."""
    if not path.exists():
        pytest.skip(f"{path} not found; tests read the real data from ../shared/data beside the repository")
    return path


@pytest.fixture(scope="session")
def cifar_train() -> Path:
    return require(CIFAR_TRAIN)


@pytest.fixture(scope="session")
def cifar_test() -> Path:
    return require(CIFAR_TEST)


@pytest.fixture(scope="session")
def coco128() -> Path:
    return require(COCO128)


@pytest.fixture(scope="session")
def paper_genotypes() -> dict:
    import json

    return json.loads(require(PAPER_GENOTYPES).read_text())


@pytest.fixture(scope="session")
def cifar_batch(cifar_train):
    """128 real CIFAR-10 training images with the training augmentation, and their labels."""
    from blockswap_plugin.timm.data import load_minibatch

    images, labels, _ = load_minibatch(str(cifar_train), batch_size=128, seed=0, input_size=(3, 32, 32))
    return images, labels
