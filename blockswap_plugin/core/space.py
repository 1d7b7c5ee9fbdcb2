"""Search space of one host model: its swappable blocks and their cost tables.

A :class:`SwapSpace` lists the model's swappable blocks (*sites*), which block
types each site accepts, and the exact parameter count and MACs of every
(site, block type) pair. The tables are filled once by building each block on
its own, so the cost of any genotype is a sum of table entries and no
candidate network has to be built to be counted. Hosts (timm, mmdet) create a
space with :meth:`SwapSpace.from_model` and a function that builds one block.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .blocks import canonical_block_name, list_block_types
from .errors import BlockSwapError
from .flops import count_macs, count_params
from .genotype import Genotype

__all__ = ["BlockSite", "SwapSpace"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockSite:
    """One swappable residual block of a host model.

    Attributes:
        name: Module path of the block inside the model (``"stages.1.0"``).
        in_channels: Channels entering the block.
        out_channels: Channels leaving the block.
        stride: Spatial stride of the block.
        input_shape: Shape ``(C, H, W)`` of the block's input at the space's
            reference input size.
    """

    name: str
    in_channels: int
    out_channels: int
    stride: int
    input_shape: Tuple[int, int, int]


# (site, canonical block type name) -> a freshly built block module.
BlockBuilder = Callable[[BlockSite, str], nn.Module]


class SwapSpace:
    """Swappable sites of one model with per-site, per-type parameter and MAC tables.

    Args:
        model_name: Name recorded in genotypes (for example ``"wrn_40_2"``).
        sites: The swappable blocks, in network order.
        build_block: Builds the block for a site and block type.
        fixed_params: Parameters outside the swappable blocks.
        fixed_macs: MACs outside the swappable blocks at the reference input size.
        input_size: Reference input size ``(C, H, W)`` for MACs.
        block_types: Block type names to consider; all registered types by default.
    """

    def __init__(
        self,
        model_name: str,
        sites: Sequence[BlockSite],
        build_block: BlockBuilder,
        fixed_params: int,
        fixed_macs: int,
        input_size: Tuple[int, int, int],
        block_types: Optional[Sequence[str]] = None,
    ) -> None:
        self.model_name = model_name
        self.sites = list(sites)
        self.build_block = build_block
        self.fixed_params = int(fixed_params)
        self.fixed_macs = int(fixed_macs)
        self.input_size = tuple(input_size)
        names = [t.name for t in list_block_types()] if block_types is None else block_types
        self.block_types = [canonical_block_name(n) for n in names]
        self.params: List[Dict[str, int]] = []
        self.macs: List[Dict[str, int]] = []
        self._fill_tables()

    def _fill_tables(self) -> None:
        cache: Dict[tuple, Optional[Tuple[int, int]]] = {}
        for index, site in enumerate(self.sites):
            params_row: Dict[str, int] = {}
            macs_row: Dict[str, int] = {}
            for name in self.block_types:
                # NOTE: sites of equal shape share table entries, which assumes a
                # host builds the same block for the same shape and type.
                key = (site.in_channels, site.out_channels, site.stride, site.input_shape, name)
                if key not in cache:
                    try:
                        # Built on the meta device: shapes and FLOPs only, no memory or compute.
                        with torch.device("meta"):
                            block = self.build_block(site, name)
                    except ValueError as exc:
                        # The type does not fit this site (channels not divisible by its groups).
                        _logger.debug("block type %s skipped at %s: %s", name, site.name, exc)
                        cache[key] = None
                    else:
                        cache[key] = (count_params(block), count_macs(block, (1, *site.input_shape)))
                if cache[key] is not None:
                    params_row[name], macs_row[name] = cache[key]
            if not params_row:
                raise BlockSwapError(f"no block type fits site {site.name}; widen the block type list")
            self.params.append(params_row)
            self.macs.append(macs_row)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        model_name: str,
        site_names: Sequence[str],
        build_block: BlockBuilder,
        input_size: Tuple[int, int, int],
        block_types: Optional[Sequence[str]] = None,
        site_channels: Optional[Callable[[nn.Module], Tuple[int, int, int]]] = None,
    ) -> "SwapSpace":
        """Create a space by running ``model`` once at ``input_size``.

        One forward pass records each site's input shape, the model's total
        MACs and each site's own MACs, so the cost outside the sites is the
        total minus the sites' share.

        Args:
            model: The host model; it is not modified.
            model_name: Name recorded in genotypes.
            site_names: Module paths of the swappable blocks, in network order.
            build_block: Builds the block for a site and block type.
            input_size: ``(C, H, W)`` used for MACs and input shapes.
            block_types: Block type names to consider; all by default.
            site_channels: Returns ``(in_channels, out_channels, stride)`` for a
                block module; by default read from the input and output shapes.
        """
        model = copy.deepcopy(model).to("meta")
        # Not chained: some hosts (mmdet 3.3.0's ResNet) return None from train().
        model.eval()
        shapes: Dict[str, Tuple[tuple, tuple]] = {}
        handles = []
        for name in site_names:
            def hook(module, args, output, key=name):
                shapes[key] = (tuple(args[0].shape[1:]), tuple(output.shape[1:]))

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        try:
            total_macs, per_module = count_macs(model, (1, *input_size), per_module=True)
        finally:
            for handle in handles:
                handle.remove()
        missing = [n for n in site_names if n not in shapes]
        if missing:
            raise BlockSwapError(f"blocks {missing} did not run in a forward pass at input size {input_size}")

        sites = []
        site_params = 0
        site_macs = 0
        for name in site_names:
            block = model.get_submodule(name)
            (cin, hin, win), (cout, hout, _) = shapes[name]
            if site_channels is not None:
                cin, cout, stride = site_channels(block)
            else:
                stride = max(1, round(hin / hout))
            sites.append(BlockSite(name, cin, cout, stride, (cin, hin, win)))
            site_params += count_params(block)
            site_macs += per_module.get(name, 0)
        fixed_params = count_params(model) - site_params
        fixed_macs = total_macs - site_macs
        return cls(model_name, sites, build_block, fixed_params, fixed_macs, input_size, block_types)

    def __len__(self) -> int:
        return len(self.sites)

    def choices(self, index: int) -> List[str]:
        """Block types that fit site ``index``."""
        return list(self.params[index])

    def check(self, genotype: Genotype) -> Genotype:
        """Validate a genotype against this space and return it.

        Raises:
            BlockSwapError: On a wrong length or a block type that does not fit a site.
        """
        if len(genotype) != len(self.sites):
            raise BlockSwapError(
                f"genotype has {len(genotype)} blocks but {self.model_name} has {len(self.sites)} "
                "swappable blocks; use a genotype made for this model"
            )
        for index, name in enumerate(genotype.blocks):
            if name not in self.params[index]:
                raise BlockSwapError(
                    f"block type {name} does not fit block {index} ({self.sites[index].name}, "
                    f"{self.sites[index].in_channels}->{self.sites[index].out_channels} channels); "
                    f"choose one of {', '.join(self.params[index])}"
                )
        return genotype

    def genotype(self, blocks: Sequence[str], meta: Optional[dict] = None) -> Genotype:
        """Build and validate a genotype for this space from block names."""
        return self.check(Genotype(self.model_name, blocks, meta))

    def count_params(self, genotype: Sequence[str]) -> int:
        """Exact parameter count of the network with this genotype, from the tables."""
        blocks = genotype.blocks if isinstance(genotype, Genotype) else genotype
        return self.fixed_params + sum(self.params[i][canonical_block_name(b)] for i, b in enumerate(blocks))

    def count_macs(self, genotype: Sequence[str]) -> int:
        """MACs of the network with this genotype at the reference input size, from the tables."""
        blocks = genotype.blocks if isinstance(genotype, Genotype) else genotype
        return self.fixed_macs + sum(self.macs[i][canonical_block_name(b)] for i, b in enumerate(blocks))

    def param_range(self) -> Tuple[int, int]:
        """Smallest and largest parameter counts any genotype reaches."""
        low = self.fixed_params + sum(min(row.values()) for row in self.params)
        high = self.fixed_params + sum(max(row.values()) for row in self.params)
        return low, high

    def macs_range(self) -> Tuple[int, int]:
        """Smallest and largest MACs any genotype reaches."""
        low = self.fixed_macs + sum(min(row.values()) for row in self.macs)
        high = self.fixed_macs + sum(max(row.values()) for row in self.macs)
        return low, high

    def apply(self, model: nn.Module, genotype: Genotype) -> nn.Module:
        """Replace every site of ``model`` in place by its block from ``genotype``."""
        self.check(genotype)
        for index, name in enumerate(genotype.blocks):
            model.set_submodule(self.sites[index].name, self.build_block(self.sites[index], name))
        return model
