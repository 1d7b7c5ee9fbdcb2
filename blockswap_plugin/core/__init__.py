"""Framework-free BlockSwap engine: block pool, genotypes, counting, Fisher potential, search.

Nothing in this package imports timm, mmengine or mmdet.
"""
from .blocks import BlockType, build_block, canonical_block_name, get_block_type, list_block_types, register_block_type
from .errors import BlockSwapError
from .fisher import (
    BranchPoint,
    BranchTap,
    find_branch_points,
    fisher_from_activations,
    fisher_potential,
    fisher_potential_per_block,
    register_branch_locator,
)
from .flops import count_macs, count_params
from .genotype import Genotype, write_json_atomic
from .init import init_paper_
from .sampler import Budget, check_budgets, sample_genotypes
from .search import Candidate, SearchResult, candidate_seed, score_candidate, search
from .space import BlockSite, SwapSpace
