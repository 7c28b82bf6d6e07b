"""A lower bound on the time of one BSD training step of a model on this machine, from measured parts.

    python bench/floor.py [--model models/fmnist_mlp.py] [--batch-size 128] [--threads 2]

It measures, in one process, interleaved round after round so that machine noise hits every part alike:

- the GEMM roofline: a 2048^3 fp32 matmul (the same probe ``bsdgraph bench`` divides by);
- the memory bandwidth of a large copy (64 MiB, far beyond the caches), read + write;
- the engine's fixed cost per step: the same model with every hidden layer 8 wide and batch 16, where the
  arithmetic is negligible and what remains is launching the plan (Python, allocation, small tensor ops),
  timed warm (consecutive steps), i.e. at its smallest;
- the AdamW update of the model's F and B parameters with torch's fused kernel, cold (the whole step's data has
  passed through the caches since the last update, as in training);
- the full step.

and prints the floor: the plan's dense FLOPs at 100 % of the roofline + the AdamW update + the fixed cost,
beside the step time a given fraction of the roofline needs. The floor leaves out LIF scans, ReCo's
elementwise work and the cast of spikes, so the real lower bound is higher still.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bsdgraph.tools.bench import _batch, roofline_probe, time_interleaved
from bsdgraph.compiler.cost import plan_flops
from bsdgraph.compiler.model_file import load_model  # noqa: E402
from bsdgraph.compiler.passes import set_hidden_width  # noqa: E402
from bsdgraph.compiler.program import compile_model  # noqa: E402
from bsdgraph.train.config import TrainConfig
from bsdgraph.train.trainer import make_runtime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/fmnist_mlp.py")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--fraction", type=float, default=0.5, help="roofline fraction to compare with (default 0.5)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    cfg = TrainConfig.from_model(model.train)
    engine = make_runtime(compile_model(model), "cpu", cfg)
    x, y = _batch(model.graph, args.batch_size)
    flop = plan_flops(engine.plan, engine.graph, args.batch_size)

    tiny_model = dataclasses.replace(model, graph=set_hidden_width(model.graph, 8))
    tiny = make_runtime(compile_model(tiny_model), "cpu", cfg)
    tx, ty = _batch(tiny_model.graph, 16)

    probe, probe_flop = roofline_probe()
    big = torch.rand(16 * 2**20)  # 64 MiB
    dst = torch.empty_like(big)

    params = list(engine.params.values())
    grads = [torch.randn_like(q) * 1e-3 for q in params]
    m1, m2 = [torch.zeros_like(q) for q in params], [torch.zeros_like(q) for q in params]
    step_counts = [torch.zeros((), dtype=torch.float32) for _ in params]
    flush = torch.empty(64 * 2**20 // 4)
    adamw_times = []

    def adamw():
        """One fused AdamW update, timed without the cache flush that precedes it (in a training step the whole
        step's data passes through the caches between two updates)."""
        flush.fill_(1.0)
        t0 = time.perf_counter()
        torch._fused_adamw_(params, grads, m1, m2, [], step_counts, lr=1e-3, beta1=0.9, beta2=0.999,
                            weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
        adamw_times.append(time.perf_counter() - t0)

    times = time_interleaved({"roofline": probe, "copy": lambda: dst.copy_(big), "adamw": adamw,
                              "step": lambda: engine.step(x, y)}, args.rounds, 1)
    t = {k: statistics.median(v) for k, v in times.items()}
    t["adamw"] = statistics.median(adamw_times[1:])  # the timed calls, not the warm-up's
    # the fixed cost warm (consecutive tiny steps, everything cached): the smallest it can be, for a lower bound
    fixed = time_interleaved({"fixed": lambda: tiny.step(tx, ty)}, 5 * args.rounds, 1)["fixed"]
    t["fixed"] = statistics.median(fixed)
    roofline = probe_flop / t["roofline"] / 1e9
    bandwidth = 2 * big.numel() * 4 / t["copy"] / 1e9
    n_params = sum(q.numel() for q in params)
    gemm_ms = flop / (roofline * 1e9) * 1e3
    floor_ms = gemm_ms + 1e3 * (t["adamw"] + t["fixed"])
    need_ms = flop / (args.fraction * roofline * 1e9) * 1e3
    print(f"{args.model}: batch {args.batch_size}, {args.threads} threads, medians of {args.rounds} interleaved rounds")
    print(f"  GEMM roofline (2048^3 fp32)          {roofline:8.1f} GFLOP/s")
    print(f"  memory bandwidth (64 MiB copy, r+w)  {bandwidth:8.1f} GB/s")
    print(f"  plan's dense work                    {flop / 1e9:8.3f} GFLOP -> {gemm_ms:6.2f} ms "
          "at 100 % of the roofline")
    print(f"  AdamW, {n_params / 1e6:.2f} M parameters (cold)    {1e3 * t['adamw']:8.2f} ms "
          f"({n_params * 28 / 1e6:.0f} MB moved: {n_params * 28 / t['adamw'] / 1e9:.1f} GB/s)")
    print(f"  fixed cost per step (width 8, B 16, warm) {1e3 * t['fixed']:5.2f} ms")
    print(f"  floor = GEMMs + AdamW + fixed        {floor_ms:8.2f} ms")
    print(f"  step for {args.fraction:.2f} of the roofline      {need_ms:8.2f} ms")
    print(f"  the step now                         {1e3 * t['step']:8.2f} ms "
          f"({flop / t['step'] / 1e9 / roofline:.2f} of the roofline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
