"""Which global rank does what: a small pure object, tested without any process group."""

from __future__ import annotations

from dataclasses import dataclass

from online_stablerep.config.validate import ConfigError, parse_generators


@dataclass(frozen=True)
class Roles:
    """The role layout of a job of `world_size` ranks.

    Trainers take the lowest global ranks 0..T-1 (DeepSpeed's logging and checkpoint code
    assume global rank 0 takes part); generators take T..W-1. With no generators every rank
    trains and runs its own producer in-process (colocated mode).
    """

    world_size: int
    num_generators: int

    @classmethod
    def from_spec(cls, spec: str, world_size: int, local_world_size: int | None = None) -> Roles:
        """Build from `roles.generators` ("2" or "1/node") and the launcher's sizes.

        Raises:
            ConfigError: when the layout leaves no trainer or asks for more ranks than exist.
        """
        count, per_node = parse_generators(spec)
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        if per_node:
            local = local_world_size or world_size
            if world_size % local:
                raise ConfigError(
                    f"roles.generators={spec!r}: world size {world_size} is not a multiple of "
                    f"the ranks per node {local}"
                )
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
        return cls(world_size=world_size, num_generators=count)

    @property
    def colocated(self) -> bool:
        return self.num_generators == 0

    @property
    def num_trainers(self) -> int:
        return self.world_size - self.num_generators

    @property
    def trainer_ranks(self) -> list[int]:
        return list(range(self.num_trainers))

    @property
    def generator_ranks(self) -> list[int]:
        return list(range(self.num_trainers, self.world_size))

    def is_trainer(self, rank: int) -> bool:
        return 0 <= rank < self.num_trainers

    def is_generator(self, rank: int) -> bool:
        return self.num_trainers <= rank < self.world_size

    def generator_index(self, rank: int) -> int:
        """0-based index of a generator rank among the generators (its caption shard)."""
        assert self.is_generator(rank), rank
        return rank - self.num_trainers

    def producer_shard(self, rank: int) -> tuple[int, int]:
        """(shard index, number of shards) of the caption stream the producer on `rank` reads."""
        if self.colocated:
            return rank, self.world_size
        return self.generator_index(rank), self.num_generators

    def describe(self) -> str:
        if self.colocated:
            return f"colocated: {self.world_size} rank(s), each trains and produces"
        return (
            f"hybrid: trainers {self.trainer_ranks[0]}..{self.trainer_ranks[-1]}, "
            f"generators {self.generator_ranks[0]}..{self.generator_ranks[-1]}"
        )
