"""Group topology: which groups a rank trains and which ranks form each group's data-parallel world.

One code path, three mappings:
- ``--group_id i``: this launch is group i alone; every rank of the launch belongs to it and
  peers are reached only through files in the run directory.
- W >= G (W % G == 0): W/G consecutive ranks form each group (world split).
- W < G (G % W == 0): each rank hosts G/W consecutive groups and steps their engines in turn.
Each hosted group gets an ``mpu`` for deepspeed.initialize whose data-parallel group holds
exactly that group's ranks, so ZeRO shards and gradient all-reduces never cross groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


class TopologyError(ValueError):
    pass


@dataclass
class Topology:
    world_size: int
    rank: int
    num_groups: int
    hosted: list[int]              # groups this rank trains
    group_ranks: dict[int, list[int]]  # for every group trained in this launch: its ranks
    separate_launch: bool          # True with --group_id: peers live in other launches

    @property
    def all_groups_here(self) -> bool:
        return not self.separate_launch

    def peers(self, group: int) -> list[int]:
        return [g for g in range(self.num_groups) if g != group]

    def dp_rank(self, group: int) -> int:
        return self.group_ranks[group].index(self.rank)

    def dp_size(self, group: int) -> int:
        return len(self.group_ranks[group])

    def is_group_leader(self, group: int) -> bool:
        return self.group_ranks[group][0] == self.rank


def plan(world_size: int, rank: int, num_groups: int, group_id: int | None = None) -> Topology:
    if num_groups < 1:
        raise TopologyError(f"--num_groups must be >= 1, got {num_groups}")
    if group_id is not None:
        if not 0 <= group_id < num_groups:
            raise TopologyError(f"--group_id {group_id} is outside 0..{num_groups - 1} (--num_groups {num_groups})")
        return Topology(world_size, rank, num_groups, [group_id], {group_id: list(range(world_size))}, True)
    if world_size >= num_groups:
        if world_size % num_groups:
            raise TopologyError(f"{world_size} ranks cannot be split into {num_groups} equal groups: "
                                "use a world size that is a multiple of --num_groups, or --group_id")
        per = world_size // num_groups
        ranks = {g: list(range(g * per, (g + 1) * per)) for g in range(num_groups)}
        return Topology(world_size, rank, num_groups, [rank // per], ranks, False)
    if num_groups % world_size:
        raise TopologyError(f"{num_groups} groups cannot be spread evenly over {world_size} ranks: "
                            "use a --num_groups that is a multiple of the world size")
    per = num_groups // world_size
    ranks = {g: [g // per] for g in range(num_groups)}
    return Topology(world_size, rank, num_groups, list(range(rank * per, (rank + 1) * per)), ranks, False)


class GroupMPU:
    """The mpu object deepspeed.initialize accepts: data parallel = the group, no model parallel."""

    def __init__(self, dp_group, dp_ranks: list[int], rank: int, self_group):
        self._dp_group, self._dp_ranks, self._rank, self._self_group = dp_group, dp_ranks, rank, self_group

    def get_data_parallel_group(self):
        return self._dp_group

    def get_data_parallel_rank(self):
        return self._dp_ranks.index(self._rank)

    def get_data_parallel_world_size(self):
        return len(self._dp_ranks)

    def get_data_parallel_group_ranks(self):
        return list(self._dp_ranks)

    def get_model_parallel_group(self):
        return self._self_group

    def get_model_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


def build_mpus(topo: Topology) -> dict[int, GroupMPU | None]:
    """Process groups for every hosted group. Collective: every rank must call it.

    Returns None for a group whose ranks are the whole world (DeepSpeed's default groups are
    then exactly right).
    """
    if not dist.is_initialized() or all(len(r) == topo.world_size for r in topo.group_ranks.values()):
        return {g: None for g in topo.hosted}
    # new_group is collective over the world and must be called in the same order everywhere.
    singles = [dist.new_group([r]) for r in range(topo.world_size)]
    dp = {g: dist.new_group(r) for g, r in sorted(topo.group_ranks.items())}
    self_group = singles[topo.rank]
    return {g: GroupMPU(dp[g], topo.group_ranks[g], topo.rank, self_group) for g in topo.hosted}
