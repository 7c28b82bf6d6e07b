"""Human-readable text of a ``Plan``: the schedule, then the buffers with their lifetimes."""

from __future__ import annotations


def format_plan(plan) -> str:
    lines = [f"plan {plan.graph}(T={plan.T}): {len(plan.launches)} launches, kernels: {', '.join(plan.kernels())}",
             *(["  B runs once per class present (R rows, R <= classes): losses expand it to samples"]
               if plan.dedup else []),
             "  schedule:"]
    for la in plan.launches:
        lines.append(f"    {la.index:3d} {la.phase:<10} {la.kernel:<34} {'+'.join(la.nodes):<18} "
                     f"reads {', '.join(la.reads) or '-'}  ->  {', '.join(la.writes) or '-'}")
    lines.append("  buffers (activations and gradients; live = launch range):")
    for b in plan.buffers:
        if b.name.endswith(".grad"):
            continue
        dims = ",".join(map(str, b.shape))
        lines.append(f"    {b.name:<16} {b.dtype}[{dims}]  live {b.first}..{b.last}")
    if plan.aliases:
        lines.append("  views (no launch): " + ", ".join(f"{a} = {b}" for a, b in plan.aliases))
    lines.append(f"  peak live activation memory at B=128: {plan.peak_live(128) / 2**20:.2f} MiB")
    return "\n".join(lines)
