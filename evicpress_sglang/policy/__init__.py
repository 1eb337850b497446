"""The EVICPRESS decision core, independent of SGLang: configurations, cost model,
context table, placement solver and the policies built on them."""

from .configs import DROP, GPU, Config, Tier, build_configs
from .contexts import ContextTable, prior_quality
from .cost import CostModel, calibrate
from .placement import Problem, solve, solve_exact
from .policies import EvicPressPolicy, Policy, PolicyError, Weights, make_policy, policy_names

__all__ = [
    "DROP", "GPU", "Config", "ContextTable", "CostModel", "EvicPressPolicy", "Policy", "PolicyError", "Problem",
    "Tier", "Weights", "build_configs", "calibrate", "make_policy", "policy_names", "prior_quality", "solve",
    "solve_exact",
]
