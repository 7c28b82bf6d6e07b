"""GPU readiness check of the Triton kernels: parity with the torch twins at realistic sizes, then timings.

    python bench/gpu_check.py [--quick]

On CUDA: every kernel runs against its twin (float64 on the same GPU; spikes and Philox uniforms compared
exactly, potentials and gradients within the tolerance table of tests/kernels_strategies.py), then is timed
with ``triton.testing.do_bench`` (which synchronises) and, where the launch can be captured, with
``do_bench_cudagraph`` (device time without the Python launcher). Achieved GB/s and TFLOP/s are printed next to
the H200's limits. Exit status: 0 all parity checks passed, 1 a parity check failed, 2 no CUDA device (nothing
was checked). Uses no Triton API newer than 3.6.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import encode, lif, linear_lif, local_update, reco  # noqa: E402
from kernels.ref import encode as encode_twin  # noqa: E402
from kernels.ref import lif as lif_twin  # noqa: E402
from kernels.ref import linear_lif as linear_lif_twin  # noqa: E402
from kernels.ref import reco as reco_twin  # noqa: E402

# H200 SXM: HBM3e bandwidth and dense bf16 tensor-core peak from the spec sheet, bf16 as measured on the lent
# machine (8192^3 torch matmul, docs of the device tool), fp32 FMA peak (no tensor cores) from the spec sheet.
# The fp32 figure is the relevant ceiling here: every tl.dot uses input_precision="ieee", which Triton runs on
# FMA units, not tensor cores.
DEVICE = "cuda"  # a module constant so that the checks' own logic can be dry-run elsewhere; main() needs CUDA
H200 = {"hbm_tb_s": 4.8, "bf16_tflop_s": 990.0, "bf16_measured_tflop_s": 790.0, "fp32_fma_tflop_s": 67.0}

FULL = dict(lif_t=8, lif_m=2**20, lin=(4, 128, 784, 1024), reco=(128, 4 * 1024), wgrad=(512, 1024, 784),
            enc=(128, 784, 8), rep=100)
QUICK = dict(lif_t=8, lif_m=2**16, lin=(4, 32, 784, 256), reco=(64, 1024), wgrad=(128, 256, 784),
             enc=(32, 784, 8), rep=20)


@dataclass
class Row:
    name: str
    ok: bool
    parity: str
    bytes_moved: float = 0.0
    flops: float = 0.0
    ms: Optional[float] = None
    ms_graph: Optional[float] = None


def within(actual, expected, bound) -> tuple[bool, str]:
    """Elementwise |actual - expected| <= bound (NaN fails); returns (ok, 'max err, worst err/bound')."""
    err = (actual.double() - expected.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64, device=err.device).expand_as(err)
    ok = bool((err <= bound).all())
    ratio = float((err / bound.clamp(min=1e-300)).nan_to_num(nan=float("inf")).max())
    return ok, f"max|err| {float(err.max()):.2e}, err/bound {ratio:.3g}"


def spikes_equal(actual, expected) -> tuple[bool, str]:
    mismatches = int((actual != expected).sum())
    return mismatches == 0, f"{mismatches} spike mismatches of {actual.numel()}"


@triton.jit
def _uniforms_kernel(offset_ptr, u_ptr, n, seed, BLOCK: tl.constexpr):
    """Raw tl.rand(seed, offset) for given int64 offsets."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(u_ptr + offs, tl.rand(seed, tl.load(offset_ptr + offs, mask=mask, other=0)), mask=mask)


def time_it(row: Row, fn: Callable[[], object], rep: int) -> Row:
    """Median ms with do_bench (launcher included) and, if the launch can be captured, with CUDA graphs."""
    row.ms = triton.testing.do_bench(fn, rep=rep, return_mode="median")
    try:
        row.ms_graph = triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception as exc:  # capture may be refused (allocator, host sync); the do_bench number stands
        print(f"  note: {row.name}: no CUDA-graph timing ({type(exc).__name__}: {str(exc)[:80]})")
    return row


def check_lif(cfg) -> list[Row]:
    from tests import kernels_strategies as ks

    T, M = cfg["lif_t"], cfg["lif_m"]
    rows = []
    for p in (ks.LifParams(2.0, 0.3, 0.0, False), ks.LifParams(4.0, 0.5, -0.1, True)):
        cur = ks.keep_lif_margin(ks.lif_currents((T, M), p, 0).to(DEVICE), p)
        spikes, h = lif.lif_forward(cur, *p.args, return_h=True)
        ref_spikes, ref_h = lif_twin.lif_forward(cur.double(), *p.args, return_h=True)
        ok_s, msg_s = spikes_equal(spikes, ref_spikes)
        ok_h, msg_h = within(h, ref_h, ks.TOL["lif_h"] * ks.lif_potential_scale(cur, p))
        reset = "soft" if p.soft_reset else "hard"
        row = Row(f"lif_forward {reset} T={T} M={M}", ok_s and ok_h, f"{msg_s}; h {msg_h}", T * M * (4 + 1))
        rows.append(time_it(row, lambda: lif.lif_forward(cur, *p.args), cfg["rep"]))
        grad_h = torch.randn_like(h)
        got = lif.lif_backward(grad_h, h, *p.args, 2.0)
        ref = lif_twin.lif_backward(grad_h.double(), h.double(), *p.args, 2.0)
        ok, msg = within(got, ref, ks.TOL["lif_grad"] * ks.lif_grad_scale(grad_h, h, p, 2.0))
        row = Row(f"lif_backward {reset} T={T} M={M}", ok, msg, T * M * 12)
        rows.append(time_it(row, lambda: lif.lif_backward(grad_h, h, *p.args, 2.0), cfg["rep"]))
    return rows


def check_linear_lif(cfg) -> list[Row]:
    from tests import kernels_strategies as ks

    T, B, K, N = cfg["lin"]
    p = ks.LifParams(2.0, 0.3, 0.0, False)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for spikes_in in (True, False):
        s_in = torch.rand(T, B, K, device=DEVICE, generator=gen)
        s_in = (s_in < 0.2).to(torch.uint8) if spikes_in else s_in
        weight = torch.randn(N, K, device=DEVICE, generator=gen) * 2 * p.v_th / (0.2 * K) ** 0.5
        bias = 0.5 * p.v_th * torch.randn(N, device=DEVICE, generator=gen)
        shaped = ks.keep_linear_margin(s_in, weight, bias, p)
        kind = "uint8" if spikes_in else "fp32"
        name = f"linear_lif {kind} T={T} B={B} K={K} N={N}"
        if shaped is None:
            rows.append(Row(name, False, "could not shape inputs to the spike margin (check the generator)"))
            continue
        weight, bias = shaped
        spikes, v, h = linear_lif.linear_lif_forward(s_in, weight, bias, *p.args, return_v=True, return_h=True)
        ref_s, ref_v, ref_h = linear_lif_twin.linear_lif_forward(
            s_in if spikes_in else s_in.double(), weight.double(), bias.double(), *p.args, True, True
        )
        abs_cur = s_in.double().abs() @ weight.double().abs().T + bias.double().abs()
        bound = ks.TOL["dot"] * (K + 1) * abs_cur
        ok_s, msg_s = spikes_equal(spikes, ref_s)
        ok_v, msg_v = within(v, ref_v, bound)
        ok_h, msg_h = within(h, ref_h, float(bound.max()) + ks.TOL["lif_h"] * ks.lif_potential_scale(ref_v, p))
        moved = s_in.numel() * s_in.element_size() + weight.numel() * 4 + T * B * N
        row = Row(name, ok_s and ok_v and ok_h, f"{msg_s}; V {msg_v}; h {msg_h}", moved, 2.0 * T * B * K * N)
        rows.append(time_it(row, lambda: linear_lif.linear_lif_forward(s_in, weight, bias, *p.args), cfg["rep"]))

        # the same layer unfused, as the triton backend runs it on CUDA: cuBLAS fp32 GEMM, then the LIF kernel
        def unfused():
            cur = torch.nn.functional.linear(s_in.reshape(T * B, K).float(), weight, bias).reshape(T, B, N)
            return lif.lif_forward(cur, *p.args, return_h=True)

        got_s, got_h = unfused()
        ok_s, msg_s = spikes_equal(got_s, ref_s)
        ok_h, msg_h = within(got_h, ref_h, float(bound.max()) + ks.TOL["lif_h"] * ks.lif_potential_scale(ref_v, p))
        row = Row(f"gemm+lif {kind} T={T} B={B} K={K} N={N}", ok_s and ok_h, f"{msg_s}; h {msg_h}", moved,
                  2.0 * T * B * K * N)
        rows.append(time_it(row, unfused, cfg["rep"]))
    return rows


def check_reco(cfg) -> list[Row]:
    from tests import kernels_strategies as ks

    B, F = cfg["reco"]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    v = torch.randn(B, F, device=DEVICE, generator=gen).clamp(min=0)
    labels = torch.randint(0, 10, (B,), device=DEVICE, generator=gen)
    v_hat = torch.randn(10, F, device=DEVICE, generator=gen)[labels].contiguous()  # per-class codes, as in BSD
    rows = []
    for negatives in ("all", "other_class"):
        loss, gv, gh = reco.reco_loss_grad(v, v_hat, labels, 0.6, negatives, 1e-8)
        again = reco.reco_loss_grad(v, v_hat, labels, 0.6, negatives, 1e-8)
        ref_loss, ref_v, ref_h = reco_twin.reco_loss_grad(v.double(), v_hat.double(), labels, 0.6, negatives, 1e-8)
        scale_v, scale_h = ks.reco_grad_scale(v, v_hat, 0.6, 1e-8)
        unit = ks.TOL["reco"] * (F + B + 16)
        checks = [within(loss, ref_loss, unit * (4 + 4 * 0.6 * B)), within(gv, ref_v, unit * scale_v),
                  within(gh, ref_h, unit * scale_h)]
        deterministic = all(torch.equal(a, b) for a, b in zip((loss, gv, gh), again))
        parity = f"loss {checks[0][1]}; grad_v {checks[1][1]}; grad_v_hat {checks[2][1]}; " + (
            "bitwise deterministic" if deterministic else "NOT deterministic across runs")
        ok = all(c[0] for c in checks) and deterministic
        row = Row(f"reco_loss_grad {negatives} B={B} F={F}", ok, parity, 4.0 * B * F * 8, 6.0 * B * B * F)
        rows.append(time_it(row, lambda: reco.reco_loss_grad(v, v_hat, labels, 0.6, negatives, 1e-8), cfg["rep"]))
    return rows


def check_weight_grad(cfg) -> list[Row]:
    from tests import kernels_strategies as ks

    M, N, K = cfg["wgrad"]
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    grad_out = torch.randn(M, N, device=DEVICE, generator=gen)
    rows = []
    for spikes_in in (True, False):
        inp = torch.rand(M, K, device=DEVICE, generator=gen)
        inp = (inp < 0.2).to(torch.uint8) if spikes_in else inp
        dw, db = local_update.weight_grad(grad_out, inp, True)
        g, x = grad_out.double(), inp.double()
        ok_w, msg_w = within(dw, g.T @ x, ks.TOL["dot"] * (M + 1) * (g.abs().T @ x.abs()))
        ok_b, msg_b = within(db, g.sum(0), ks.TOL["dot"] * (M + 1) * g.abs().sum(0))
        kind = "uint8" if spikes_in else "fp32"
        moved = grad_out.numel() * 4 + inp.numel() * inp.element_size() + N * K * 4
        row = Row(f"weight_grad {kind} M={M} N={N} K={K}", ok_w and ok_b, f"dW {msg_w}; db {msg_b}", moved,
                  2.0 * M * N * K)
        rows.append(time_it(row, lambda: local_update.weight_grad(grad_out, inp, True), cfg["rep"]))
    return rows


def check_poisson(cfg) -> list[Row]:


    B, D, T = cfg["enc"]
    x = torch.rand(B, D, device=DEVICE)
    spikes = encode.poisson_encode(x, T, 1234)
    ok_s, msg_s = spikes_equal(spikes, encode_twin.poisson_encode(x, T, 1234))
    # The uniforms themselves, bit for bit, across the 2^31 / 2^32 counter boundaries and for 64-bit seeds.
    offsets = torch.cat([b + torch.arange(4096, device=DEVICE) for b in (0, 2**31 - 2048, 2**32 - 2048, 2**40)])
    bad = 0
    for seed in (0, 1, 2**31 + 3, 2**63 - 1):
        u = torch.empty(offsets.shape, dtype=torch.float32, device=DEVICE)
        _uniforms_kernel[(triton.cdiv(offsets.numel(), 1024),)](offsets, u, offsets.numel(), seed, BLOCK=1024)
        bad += int((u.view(torch.int32) != encode_twin.philox_uniform(seed, offsets).view(torch.int32)).sum())
    parity = f"{msg_s}; {bad} of {4 * offsets.numel()} uniforms differ bitwise from the torch Philox"
    row = Row(f"poisson_encode B={B} D={D} T={T}", ok_s and bad == 0, parity, B * D * 4 + T * B * D)
    return [time_it(row, lambda: encode.poisson_encode(x, T, 1234), cfg["rep"])]


def check_backends(cfg) -> list[Row]:
    """Whole BSD steps: the triton backend on the GPU against the reference runtime (autograd over the torch
    ops) on the same GPU, for the graphs of tests/test_triton_backend.py plus a recurrent net, which runs the
    fused recurrent Linear+LIF kernel. Same tolerances as those tests; untimed."""
    from bsdgraph import derive_feedback
    from bsdgraph.runtime.reference import ReferenceRuntime
    from bsdgraph.runtime.triton import triton_runtime
    from tests import test_recurrent as rec
    from tests.test_cpu_backend import assert_close_grads, assert_close_params, batch, well_conditioned
    from tests.test_triton_backend import CASES

    cases = {name: (lambda b=build, c=bsd_cfg: derive_feedback(b(), c), lambda g: batch(g, B=7, scale=2.0))
             for name, (build, bsd_cfg) in CASES.items()}
    cases["rnn"] = (lambda: derive_feedback(rec.rnn(encoding="sequence", task="classification")), rec.data)
    rows = []
    for (name, (make, data)), fused in ((c, f) for c in sorted(cases.items()) for f in (True, False)):
        bsd = make()
        x, y = data(bsd)
        name = f"{name} ({'fused' if fused else 'gemm+lif'})"
        ref = ReferenceRuntime(bsd, seed=3, device=DEVICE)
        tri = triton_runtime(bsd, seed=3, device=DEVICE, fuse_linear_lif=fused)
        try:
            ref_grads, _, env = ref.gradients(x, y)
            if not well_conditioned(bsd, env):
                rows.append(Row(f"backend step {name}", False, "inputs not well conditioned on this GPU: "
                                "a membrane within 1e-5 of the threshold (re-seed the case)"))
                continue
            assert_close_grads(ref_grads, tri.gradients(x, y)[0])
            r, t = ref.step(x, y), tri.step(x, y)
            assert all(abs(r.rates[k] - t.rates[k]) <= 1e-6 for k in r.rates), (r.rates, t.rates)
            assert_close_params(bsd, ref.params, tri.params)
            rows.append(Row(f"backend step {name}", True, "gradients, rates and updated weights match the reference"))
        except AssertionError as err:
            rows.append(Row(f"backend step {name}", False, f"differs from the reference: {err}"))
    return rows


def check_neurons(cfg) -> list[Row]:
    """Every generated neuron kernel (compiler/neuron_gen.py) against its generated twin in float64 on the GPU:
    spikes exact where every step keeps a margin of 1e-3 from the threshold (steps inside it are masked out of
    the comparison, as a reordered or contracted fp32 expression may flip them), membranes and gradients within
    1e-4 relative. The generated LIF forward is timed (issue target: >= 80 % of HBM bandwidth)."""
    from bsdgraph.ir.neurons import NEURONS
    from bsdgraph.runtime import neurons as rn

    T, M = cfg["lif_t"], cfg["lif_m"]
    rows = []
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for name, neuron in sorted(NEURONS.items()):
        p = neuron.defaults
        x = ((torch.rand((T, M), device=DEVICE, generator=gen) * 2 - 0.7) * 0.6).contiguous()
        out, h = rn.triton_forward(neuron, p, x, return_h=True)
        ref_out, ref_h = rn.twin_forward(neuron, p, x.double(), return_h=True)
        scale = ref_h.abs().clamp(min=1.0)
        ok_h, msg_h = within(h, ref_h, 1e-4 * scale)
        if neuron.spiking:   # compare spikes on the neurons whose every step kept the margin
            rhs = _threshold_gap(neuron, p, x.double())
            keep = (rhs.abs() > 1e-3).all(0)
            ok_s, msg_s = spikes_equal(out[:, keep], ref_out[:, keep])
            msg_s += f" ({int(keep.sum())} of {M} neurons kept the margin)"
        else:
            ok_s, msg_s = within(out, ref_out, 1e-4 * scale)
        row = Row(f"neuron {name} forward T={T} M={M}", ok_s and ok_h, f"{msg_s}; h {msg_h}",
                  T * M * (4 + (1 if neuron.spiking else 4)))
        rows.append(time_it(row, lambda: rn.triton_forward(neuron, p, x), cfg["rep"]) if name == "lif" else row)
        g_h = torch.randn_like(x)
        got = rn.triton_backward(neuron, p, 2.0, x, None, g_h)
        want = rn.twin_backward(neuron, p, 2.0, x.double(), None, g_h.double())
        ok, msg = within(got, want, 1e-4 * want.abs().clamp(min=1.0))
        rows.append(Row(f"neuron {name} backward T={T} M={M}", ok, msg, T * M * 12))
    return rows


def _threshold_gap(neuron, p, x):
    """lhs - rhs of the spike condition at every step, by the float64 twin (``h - rhs`` where rhs is constant)."""
    from bsdgraph.runtime import neurons as rn

    step = rn.twin_step_fn(neuron, p, x, 2.0, grad=False)
    gaps, states = [], None
    for t in range(x.shape[0]):
        _, h, new = step(x[t], states)
        # the rhs of the built-ins is v_th or v_th + beta * a (a before the step's reset)
        rhs = p["v_th"] + (p["beta"] * states[1] if neuron.name == "alif" and states is not None else 0.0)
        gaps.append(h - rhs)
        states = new
    return torch.stack(gaps)


def report(rows: list[Row]) -> None:
    print(f"\nH200 limits: HBM {H200['hbm_tb_s']} TB/s; dense bf16 {H200['bf16_tflop_s']:.0f} TFLOP/s "
          f"({H200['bf16_measured_tflop_s']:.0f} measured); fp32 FMA {H200['fp32_fma_tflop_s']:.0f} TFLOP/s")
    print(f"{'kernel':44s} {'parity':6s} {'ms':>8s} {'ms(graph)':>9s} {'GB/s':>8s} {'%HBM':>5s} {'TFLOP/s':>8s} "
          f"{'%fp32':>5s}")
    for r in rows:
        best = r.ms_graph or r.ms
        gbs = r.bytes_moved / (best * 1e-3) / 1e9 if best else 0.0
        tfs = r.flops / (best * 1e-3) / 1e12 if best and r.flops else 0.0
        graph = f"{r.ms_graph:9.4f}" if r.ms_graph else f"{'n/a':>9s}"
        ms = f"{r.ms:8.4f}" if r.ms else f"{'n/a':>8s}"
        print(f"{r.name:44s} {'ok' if r.ok else 'FAIL':6s} {ms} {graph} {gbs:8.1f} "
              f"{100 * gbs / (H200['hbm_tb_s'] * 1e3):5.1f} {tfs:8.2f} {100 * tfs / H200['fp32_fma_tflop_s']:5.1f}")
    print("\nGB/s and TFLOP/s use the CUDA-graph time when there is one; bytes are the minimum each kernel must move.")
    for r in rows:
        print(f"  {'ok  ' if r.ok else 'FAIL'} {r.name}: {r.parity}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and shorter timings")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_check: TRITON_INTERPRET is set, so the kernels would run in Triton's CPU interpreter; "
              "unset it to check the compiled GPU kernels.")
        return 2
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing was checked. "
              "Run it on a GPU machine; on CPU, `pytest tests/test_kernel_*.py` checks the kernels in Triton's "
              "interpreter.")
        return 2

    cfg = QUICK if args.quick else FULL
    print(f"gpu_check on {torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}"
          f"{' (quick)' if args.quick else ''}")
    rows: list[Row] = []
    for check in (check_lif, check_neurons, check_linear_lif, check_reco, check_weight_grad, check_poisson,
                  check_backends):
        try:
            rows += check(cfg)
        except Exception as exc:  # a crash is a parity failure of that kernel, and the others still run
            rows.append(Row(check.__name__, False, f"crashed: {type(exc).__name__}: {exc}"))
    report(rows)
    failed = [r.name for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
