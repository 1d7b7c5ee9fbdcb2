"""blockswap-plugin: BlockSwap network compression for timm and mmdetection.

The core (``blockswap_plugin.core``) needs only torch. When timm is installed,
importing this package also registers the CIFAR wide ResNets (``wrn_40_2``,
``wrn_16_2``, ``wrn_40_1``, ``wrn_16_1``) with timm.
"""
import importlib.util as _importlib_util

from .core import (
    BlockSwapError,
    Budget,
    Genotype,
    SearchResult,
    SwapSpace,
    count_macs,
    count_params,
    fisher_potential,
    fisher_potential_per_block,
    init_paper_,
    list_block_types,
    search,
)

__version__ = "0.1.0"

if _importlib_util.find_spec("timm") is not None:
    from . import timm as _timm_adapter  # noqa: F401  (registers the wrn_* models)
    from .api import SearchSummary, apply_genotype, blockswap, load_student, save_student, search_model
