"""Pre-flight: could the instances a launch asks for ever fit the Ray cluster's CPUs? Checked
before any actor or placement group starts, so an infeasible spec fails in seconds, naming the
pool and what is short, instead of blocking in a placement-group wait. Against the cluster's
capacity, not what is free right now: CPUs that other work holds may be released (the launch then
waits for them, bounded). Pure (no Ray): the launcher passes in what Ray reports."""
from __future__ import annotations

from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig


def pools(config: LaunchConfig) -> dict[str, InstanceGroup]:
    """The launch's instance groups by the spec section that describes them."""
    if config.mode == "colocated" or config.prefill is None:
        return {"instances" if config.mode == "colocated" else "decode": config.decode}
    return {"prefill": config.prefill, "decode": config.decode}


def cpu_shortfall(config: LaunchConfig, total_cpus: float, largest_node_cpus: float) -> str | None:
    """Why the launch's CPU bundles cannot be placed (one per instance), or None if they may."""
    groups = pools(config)
    for section, group in groups.items():
        if group.num_cpus > largest_node_cpus:
            return (f"{section}.num_cpus: each instance needs {group.num_cpus:g} CPU, but the largest "
                    f"node of the Ray cluster has {largest_node_cpus:g}")
    need = sum(g.replicas * g.num_cpus for g in groups.values())
    if need > total_cpus + 1e-9:
        asked = " + ".join(f"{s}: {g.replicas} x {g.num_cpus:g} CPU" for s, g in groups.items())
        return f"{asked} = {need:g} CPU, but the Ray cluster has {total_cpus:g} CPU in all"
    return None
