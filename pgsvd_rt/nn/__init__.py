from pgsvd_rt.nn.grouped import GroupedLowRankLinear, GroupMember, group_projections_
from pgsvd_rt.nn.lowrank import LowRankLinear, replace_linear

__all__ = [
    "LowRankLinear",
    "replace_linear",
    "GroupedLowRankLinear",
    "GroupMember",
    "group_projections_",
]
