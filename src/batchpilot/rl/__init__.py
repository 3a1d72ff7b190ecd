"""RL post-training batches (GRPO/PPO): the batch hierarchy, per-phase memory and time, the frameworks'
rules, the plan and its exports to verl, TRL and OpenRLHF.

Layering: ``rl`` sits above ``plan`` (it plans the update with :func:`batchpilot.plan.planner.plan` and
reads published recipes through :mod:`batchpilot.plan.registry`) and below the CLI.
"""
