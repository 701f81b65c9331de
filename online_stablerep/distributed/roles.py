"""Which global rank does what: a small pure object, tested without any process group.

Global ranks are numbered node by node (the deepspeed launcher and torchrun both do), so rank r
runs on node r // ranks_per_node. Two layouts:

- a total count (`roles.generators=G`): trainers take the lowest global ranks 0..T-1 and the
  generators the highest, T..W-1 (on several nodes they gather on the last nodes);
- a count per node (`roles.generators=K/node`): on every node the first local ranks train and
  the last K generate, so every node holds its trainers and its generators. Global rank 0 stays
  a trainer (DeepSpeed's logging and checkpoint code assume rank 0 takes part).

With no generators every rank trains and runs its own producer in-process (colocated mode).
"""

from __future__ import annotations

from dataclasses import dataclass

from online_stablerep.config.validate import ConfigError, parse_generators


def rank_ranges(ranks: list[int], most: int = 8) -> str:
    """"0-2,4,6-7" for [0, 1, 2, 4, 6, 7]; past `most` runs, the rest is counted."""
    runs: list[tuple[int, int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], r)
        else:
            runs.append((r, r))
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:most])
    return text + (f",... ({len(runs) - most} more runs)" if len(runs) > most else "")


@dataclass(frozen=True)
class Roles:
    """The role layout of a job of `world_size` ranks, `ranks_per_node` on each node.

    `ranks_per_node` 0 means one node. `per_node` says the generators are the last
    num_generators / nodes local ranks of every node, rather than the highest global ranks.
    """

    world_size: int
    num_generators: int
    ranks_per_node: int = 0
    per_node: bool = False

    def __post_init__(self) -> None:
        assert self.world_size % self.local_size == 0, (self.world_size, self.local_size)
        assert not self.per_node or self.num_generators % self.nodes == 0

    @classmethod
    def from_spec(cls, spec: str, world_size: int, local_world_size: int | None = None) -> Roles:
        """Build from `roles.generators` ("2" or "1/node") and the launcher's sizes.

        Raises:
            ConfigError: when the layout leaves no trainer, asks for more ranks than exist, or
                the world is not whole nodes of `local_world_size` ranks.
        """
        count, per_node = parse_generators(spec)
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        local = local_world_size or world_size
        if world_size % local:
            raise ConfigError(
                f"roles.generators={spec!r}: world size {world_size} is not a multiple of "
                f"the ranks per node {local} (every node must start as many ranks)"
            )
        if per_node:
            if count >= local:
                raise ConfigError(
                    f"roles.generators={spec!r}: {count} generators per node leaves no "
                    f"trainer on a node of {local} ranks"
                )
            count = count * (world_size // local)
        if count >= world_size:
            raise ConfigError(
                f"roles.generators={spec!r}: {count} generator ranks in a job of {world_size} "
                "ranks leaves no trainer rank (trainers need at least one)"
            )
        return cls(world_size=world_size, num_generators=count, ranks_per_node=local,
                   per_node=per_node and count > 0)

    @property
    def colocated(self) -> bool:
        return self.num_generators == 0

    @property
    def local_size(self) -> int:
        """Ranks on each node."""
        return self.ranks_per_node or self.world_size

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_size

    @property
    def num_trainers(self) -> int:
        return self.world_size - self.num_generators

    def node_of(self, rank: int) -> int:
        return rank // self.local_size

    def is_generator(self, rank: int) -> bool:
        if not 0 <= rank < self.world_size:
            return False
        if self.per_node:
            per_node = self.num_generators // self.nodes
            return rank % self.local_size >= self.local_size - per_node
        return rank >= self.num_trainers

    def is_trainer(self, rank: int) -> bool:
        return 0 <= rank < self.world_size and not self.is_generator(rank)

    @property
    def trainer_ranks(self) -> list[int]:
        """Global ranks of the trainers, ascending (the trainer group and DeepSpeed's
        data-parallel group are exactly these; a trainer's rank in them is its index here)."""
        return [r for r in range(self.world_size) if not self.is_generator(r)]

    @property
    def generator_ranks(self) -> list[int]:
        return [r for r in range(self.world_size) if self.is_generator(r)]

    def generator_index(self, rank: int) -> int:
        """0-based index of a generator rank among the generators (its caption shard)."""
        assert self.is_generator(rank), rank
        return self.generator_ranks.index(rank)

    def producer_shard(self, rank: int) -> tuple[int, int]:
        """(shard index, number of shards) of the caption stream the producer on `rank` reads."""
        if self.colocated:
            return rank, self.world_size
        return self.generator_index(rank), self.num_generators

    def preferred_trainers(self, generator: int) -> list[int]:
        """Trainers a generator sends to while any of them holds credit: those on its node when
        every node has generators (K/node), else all (a total count may leave nodes without
        generators, whose trainers would starve if generators kept to their own node)."""
        if not self.per_node:
            return self.trainer_ranks
        node = self.node_of(generator)
        return [t for t in self.trainer_ranks if self.node_of(t) == node]

    def preferred_generators(self, trainer: int) -> list[int]:
        """Generators a trainer grants credit to first (the same rule, seen from a trainer)."""
        if not self.per_node:
            return self.generator_ranks
        node = self.node_of(trainer)
        return [g for g in self.generator_ranks if self.node_of(g) == node]

    def describe(self) -> str:
        """Which ranks do what, in one line (printed by rank 0 at start)."""
        where = f"{self.nodes} node(s) of {self.local_size} rank(s)"
        if self.colocated:
            return f"colocated on {where}: every rank trains and produces"
        text = (f"hybrid on {where}: {self.num_trainers} trainer(s) (global ranks "
                f"{rank_ranges(self.trainer_ranks)}), {self.num_generators} generator(s) "
                f"(global ranks {rank_ranges(self.generator_ranks)})")
        if self.per_node:
            k = self.num_generators // self.nodes
            last = self.local_size - 1
            text += (f"; on every node local ranks {rank_ranges(list(range(last - k + 1)))} "
                     f"train and {rank_ranges(list(range(last - k + 1, last + 1)))} generate, and "
                     "generators send to their own node's trainers first")
        return text
