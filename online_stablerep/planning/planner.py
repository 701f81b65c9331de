"""The split planner: how many GPUs per node generate and how many train, and the replay settings
that keep trainers busy with mean reuse inside a budget.

Units. A trainer consumes views (rows of a batch, t per second per GPU); a generator makes images
(g per second per GPU) in caption groups of m images; each use of a group in a batch takes k of
its views. Reuse is counted per group use, the unit `replay.max_reuse` caps and the job logs as
`buffer/mean_reuse`. With T trainers and G generators, keeping every trainer busy needs

    group reuse = (T * t / k) / (G * g / m) = T*t / (G*g) * m/k

(with m == k, exactly the views each generated image must serve: T*t / (G*g)). Under a reuse
cap R the job consumes min(T*t, G*g*R*k/m) views/s; trainers idle for the rest. Colocated mode
(`roles.generators=0`) time-shares every GPU: one group use costs k/t + m/(R*g) seconds.

The plan maximises consumed views/s (minimising time to N views) over colocated mode and every
hybrid split with the same number of generators on each node; ties go to lower reuse. In this
model colocated time-sharing matches a perfectly balanced split and beats every integer split
that is off balance; what it does not model is memory (each GPU must hold the diffusion model
and the training state) and switching costs, so the best hybrid split is always reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Split:
    """Expected figures of one layout; rates are totals over all nodes."""

    # Generators per node; 0 = colocated (every GPU trains and generates in turn).
    generators_per_node: int
    trainers: int
    generators: int
    # `roles.generators` value for this layout.
    roles_spec: str
    # Views trained per second, all trainers together.
    views_per_s: float
    # Images generated per second that training actually uses.
    images_per_s: float
    # Mean uses per caption group (what `buffer/mean_reuse` will show).
    mean_reuse: float
    # Group reuse that would keep every trainer busy (inf without generators).
    required_reuse: float
    # Fraction of trainer time spent training.
    trainer_utilisation: float
    # Fraction of generator time spent generating (the rest waits for credit).
    generator_utilisation: float
    steps_per_s: float
    # Recommended replay.max_reuse and replay.capacity.
    max_reuse: int
    capacity: int

    @property
    def label(self) -> str:
        if self.generators_per_node == 0:
            return "colocated"
        return f"{self.generators_per_node} gen/node"


@dataclass(frozen=True)
class Plan:
    """The recommended split, the alternatives, and where the input rates came from."""

    best: Split
    # The best split with dedicated generator GPUs (None with one GPU per node).
    best_hybrid: Split | None
    candidates: list[Split]
    # True when some split keeps its trainers busy within the reuse budget.
    feasible: bool
    # One or two sentences: what limits the job, and infeasibility when so.
    message: str
    # Per-GPU rates the plan used and how each was obtained ("measured ..." / "ESTIMATED ...").
    gen_images_per_s: float
    train_views_per_s: float
    gen_source: str
    train_source: str
    gpus_per_node: int
    nodes: int
    reuse_budget: float
    captions_per_batch: int
    views_per_caption: int
    images_per_caption: int
    notes: list[str] = field(default_factory=list)

    @property
    def estimated(self) -> bool:
        return self.gen_source.startswith("ESTIMATED") or self.train_source.startswith("ESTIMATED")

    def overrides(self, split: Split | None = None) -> list[str]:
        """The `key=value` overrides that put `split` (default: the best) into a config."""
        split = split or self.best
        return [
            f"roles.generators={split.roles_spec}",
            f"replay.max_reuse={split.max_reuse}",
            f"replay.capacity={split.capacity}",
            f"plan.gen_images_per_s={self.gen_images_per_s:.6g}",
            f"plan.train_images_per_s={self.train_views_per_s:.6g}",
            f"plan.source={'estimated' if self.estimated else 'measured'}",
        ]

    def split_for(self, roles_spec: str) -> Split:
        """The candidate with this `roles.generators` value.

        Raises:
            ValueError: when no candidate has it.
        """
        for split in self.candidates:
            if split.roles_spec == roles_spec:
                return split
        known = ", ".join(s.roles_spec for s in self.candidates)
        raise ValueError(f"roles.generators={roles_spec!r} is not a planned layout ({known})")


@dataclass(frozen=True)
class _Inputs:
    """plan_split's arguments in the module docstring's notation."""

    g: float
    t: float
    gpus_per_node: int
    nodes: int
    n: int
    k: int
    m: int
    budget: float


def replay_capacity(n: int, max_reuse: int) -> int:
    """Groups a trainer should hold: each group lives about max_reuse batches of n draws, so
    n * max_reuse are in use at once; twice that absorbs arrival bursts, and at least 4n keeps
    n distinct captions drawable at reuse 1."""
    return max(4 * n, 2 * n * max_reuse)


def _hybrid(gen_per_node: int, p: _Inputs) -> Split:
    trainers = p.nodes * (p.gpus_per_node - gen_per_node)
    generators = p.nodes * gen_per_node
    demand_uses = trainers * p.t / p.k  # group uses/s the trainers can take
    supply_groups = generators * p.g / p.m  # fresh groups/s
    required = demand_uses / supply_groups
    if required <= p.budget:
        uses, mean_reuse = demand_uses, max(1.0, required)
        max_reuse = max(1, math.ceil(required - 1e-9))
    else:
        uses, mean_reuse = supply_groups * p.budget, p.budget
        max_reuse = max(1, math.floor(p.budget))
    spec = f"{gen_per_node}/node" if p.nodes > 1 else str(gen_per_node)
    return Split(
        generators_per_node=gen_per_node,
        trainers=trainers,
        generators=generators,
        roles_spec=spec,
        views_per_s=uses * p.k,
        images_per_s=uses / mean_reuse * p.m,
        mean_reuse=mean_reuse,
        required_reuse=required,
        trainer_utilisation=uses / demand_uses,
        generator_utilisation=uses / mean_reuse / supply_groups,
        steps_per_s=uses * p.k / (p.n * p.k * trainers),
        max_reuse=max_reuse,
        capacity=replay_capacity(p.n, max_reuse),
    )


def _colocated(p: _Inputs) -> Split:
    gpus = p.nodes * p.gpus_per_node
    max_reuse = max(1, math.floor(p.budget))
    train_s, gen_s = p.k / p.t, p.m / (max_reuse * p.g)  # seconds per group use on one GPU
    uses = gpus / (train_s + gen_s)
    return Split(
        generators_per_node=0,
        trainers=gpus,
        generators=0,
        roles_spec="0",
        views_per_s=uses * p.k,
        images_per_s=uses / max_reuse * p.m,
        mean_reuse=float(max_reuse),
        required_reuse=math.inf,
        trainer_utilisation=train_s / (train_s + gen_s),
        generator_utilisation=gen_s / (train_s + gen_s),
        steps_per_s=uses * p.k / (p.n * p.k * gpus),
        max_reuse=max_reuse,
        capacity=replay_capacity(p.n, max_reuse),
    )


def plan_split(
    gen_images_per_s: float,
    train_views_per_s: float,
    gpus_per_node: int,
    nodes: int,
    captions_per_batch: int,
    views_per_caption: int,
    images_per_caption: int,
    reuse_budget: float,
    gen_source: str = "measured",
    train_source: str = "measured",
    include_colocated: bool = True,
) -> Plan:
    """Choose the split that trains the most views per second within the reuse budget.

    Args:
        gen_images_per_s: images one generator GPU makes per second.
        train_views_per_s: views one trainer GPU trains per second.
        gpus_per_node: GPUs on each node.
        nodes: number of nodes.
        captions_per_batch: n of the batch on each trainer.
        views_per_caption: k, views drawn from a group per use.
        images_per_caption: m, images in a generated group.
        reuse_budget: the largest acceptable mean uses per group (>= 1).
        gen_source: how gen_images_per_s was obtained (printed with the plan).
        train_source: how train_views_per_s was obtained.
        include_colocated: whether colocated mode may be recommended.

    Raises:
        ValueError: for non-positive rates, counts or a budget below 1.
    """
    for name, value in [("gen_images_per_s", gen_images_per_s),
                        ("train_views_per_s", train_views_per_s),
                        ("gpus_per_node", gpus_per_node), ("nodes", nodes),
                        ("captions_per_batch", captions_per_batch),
                        ("views_per_caption", views_per_caption),
                        ("images_per_caption", images_per_caption)]:
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if reuse_budget < 1:
        raise ValueError(f"reuse budget must be >= 1 (1 = every group used once), got {reuse_budget}")
    p = _Inputs(gen_images_per_s, train_views_per_s, gpus_per_node, nodes, captions_per_batch,
                views_per_caption, images_per_caption, reuse_budget)
    hybrids = [_hybrid(x, p) for x in range(1, gpus_per_node)]
    candidates = ([_colocated(p)] if include_colocated or not hybrids else []) + hybrids

    def rank(split: Split) -> tuple[float, float]:
        return round(split.views_per_s, 9), -split.mean_reuse

    best = max(candidates, key=rank)
    best_hybrid = max(hybrids, key=rank) if hybrids else None
    feasible = any(s.required_reuse <= reuse_budget for s in hybrids)
    if not hybrids:
        message = "one GPU per node: colocated mode is the only layout."
    elif feasible:
        message = "trainers can be kept busy within the reuse budget."
    else:
        least = min(hybrids, key=lambda s: s.required_reuse)
        message = (
            f"INFEASIBLE: no split keeps its trainers busy within reuse {reuse_budget:g}. The "
            f"least-reuse split ({least.generators} generator(s), {least.trainers} trainer(s)) "
            f"needs mean reuse {least.required_reuse:.1f}; capped at {least.max_reuse} its "
            f"trainers idle {1 - least.trainer_utilisation:.0%} of the time."
        )
    limit = "generation" if best.trainer_utilisation < 0.999 else "training"
    message += f" Recommended: {best.label}, limited by {limit}."
    return Plan(best, best_hybrid, candidates, feasible, message, gen_images_per_s, train_views_per_s,
                gen_source, train_source, gpus_per_node, nodes, reuse_budget,
                captions_per_batch, views_per_caption, images_per_caption)


def format_plan(plan: Plan, total_views: float = 9e8) -> str:
    """The plan as the console table `online-stablerep plan` prints.

    Args:
        plan: the plan.
        total_views: views of the hours column (default: the paper's 1x schedule, 109k steps
            of 8,256 views).
    """
    lines = [
        f"generator: {plan.gen_images_per_s:.4g} images/s per GPU  [{plan.gen_source}]",
        f"trainer:   {plan.train_views_per_s:.4g} views/s per GPU  [{plan.train_source}]",
        f"layout:    {plan.nodes} node(s) x {plan.gpus_per_node} GPUs; batch n={plan.captions_per_batch}"
        f" x k={plan.views_per_caption} per trainer; m={plan.images_per_caption} images per group;"
        f" reuse budget {plan.reuse_budget:g}",
        *plan.notes,
        f"hours: time to train {total_views:.3g} views; steps/s: steps of n x k views on every "
        "trainer",
        "",
        f"{'split':>12} {'gen':>4} {'train':>5} {'train util':>10} {'gen util':>8} "
        f"{'mean reuse':>10} {'need reuse':>10} {'img/s made':>10} {'views/s':>10} "
        f"{'steps/s':>8} {'hours':>7}",
    ]
    for s in plan.candidates:
        mark = "*" if s is plan.best else " "
        need = "-" if math.isinf(s.required_reuse) else f"{s.required_reuse:.2f}"
        row = (f"{mark}{s.label:>11} {s.generators:>4} {s.trainers:>5} "
               f"{s.trainer_utilisation:>10.1%} {s.generator_utilisation:>8.1%} "
               f"{s.mean_reuse:>10.2f} {need:>10} {s.images_per_s:>10.4g} "
               f"{s.views_per_s:>10.4g} {s.steps_per_s:>8.3g} "
               f"{total_views / s.views_per_s / 3600:>7.1f}")
        lines.append(row)
    kind = "ESTIMATED (FLOP model)" if plan.estimated else "from measured rates"
    lines += ["", f"figures are {kind}. {plan.message}",
              "overrides: " + " ".join(plan.overrides())]
    if plan.best_hybrid is not None and plan.best_hybrid is not plan.best:
        lines.append("best split with dedicated generators: "
                     + " ".join(plan.overrides(plan.best_hybrid)))
    return "\n".join(lines)


# Job figures (TensorBoard tags) compared with the plan: tag -> (label, Split attribute).
_COMPARED = {
    "train/images_per_s": ("trained views/s", "views_per_s"),
    "gen/images_per_s": ("generated images/s", "images_per_s"),
    "buffer/mean_reuse": ("mean reuse", "mean_reuse"),
}


def plan_deviation(plan: Plan, measured: dict[str, float], roles_spec: str | None = None) -> str:
    """One line saying how far a running job's figures are from its plan.

    Args:
        plan: the plan the job was configured from.
        measured: job figures by TensorBoard tag: any of `train/images_per_s` (all trainers),
            `gen/images_per_s` (all generators), `buffer/mean_reuse`, `train/idle_fraction`.
        roles_spec: the job's `roles.generators`, to compare with that layout's figures
            (default: the recommended one).
    """
    split = plan.split_for(roles_spec) if roles_spec is not None else plan.best
    parts = []
    for tag, (label, attribute) in _COMPARED.items():
        if tag in measured:
            expected = getattr(split, attribute)
            change = measured[tag] / expected - 1 if expected else math.inf
            parts.append(f"{label} {measured[tag]:.4g} (plan {expected:.4g}, {change:+.0%})")
    if "train/idle_fraction" in measured:
        parts.append(f"trainer idle {measured['train/idle_fraction']:.0%} "
                     f"(plan {1 - split.trainer_utilisation:.0%})")
    if not parts:
        return "vs plan: no comparable figures"
    kind = "estimated" if plan.estimated else "measured"
    return f"vs plan ({kind}): " + "; ".join(parts)
