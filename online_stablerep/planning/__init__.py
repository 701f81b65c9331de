"""Performance model and split planning: FLOPs per generated image and trained view (`flops`),
and the generator/trainer split with its replay settings (`planner`)."""

from online_stablerep.planning.planner import Plan, Split, format_plan, plan_deviation, plan_split

__all__ = ["Plan", "Split", "format_plan", "plan_deviation", "plan_split"]
