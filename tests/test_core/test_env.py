"""On/off switches from environment variables."""
import pytest

from blockswap_plugin.core.env import env_flag
from blockswap_plugin.core.errors import BlockSwapError


@pytest.mark.parametrize("text", ["1", "true", "Yes", " ON "])
def test_env_flag_on_values(monkeypatch, text):
    monkeypatch.setenv("BLOCKSWAP_TEST_FLAG", text)
    assert env_flag("BLOCKSWAP_TEST_FLAG", default=False) is True


@pytest.mark.parametrize("text", ["0", "false", "No", "OFF"])
def test_env_flag_off_values(monkeypatch, text):
    monkeypatch.setenv("BLOCKSWAP_TEST_FLAG", text)
    assert env_flag("BLOCKSWAP_TEST_FLAG") is False


def test_env_flag_unset_or_empty(monkeypatch):
    monkeypatch.delenv("BLOCKSWAP_TEST_FLAG", raising=False)
    assert env_flag("BLOCKSWAP_TEST_FLAG") is True
    monkeypatch.setenv("BLOCKSWAP_TEST_FLAG", "")
    assert env_flag("BLOCKSWAP_TEST_FLAG", default=False) is False


def test_env_flag_rejects_typo(monkeypatch):
    monkeypatch.setenv("BLOCKSWAP_TEST_FLAG", "flase")
    with pytest.raises(BlockSwapError, match="BLOCKSWAP_TEST_FLAG='flase' is not an on/off value"):
        env_flag("BLOCKSWAP_TEST_FLAG")
