from pgsvd_rt.nn.grouped import GroupedLowRankLinear, GroupMember, group_projections_, pad_ranks_
from pgsvd_rt.nn.int8 import LowRankLinearInt8
from pgsvd_rt.nn.lowrank import LowRankLinear, replace_linear

__all__ = [
    "LowRankLinear",
    "LowRankLinearInt8",
    "replace_linear",
    "pad_ranks_",
    "GroupedLowRankLinear",
    "GroupMember",
    "group_projections_",
]
