"""The native LIF kernel (bsdgraph/runtime/native.py) against the cpu backend's torch loop, bit for bit, and its
fallbacks (BSDGRAPH_NATIVE=0, a missing or failing compiler) and its cache's SHA-256 records (a damaged library is
rebuilt, never loaded)."""

import os
import shlex
import shutil
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bsdgraph.runtime import cpu, native
from kernels.ref import lif as twin

HAS_CC = shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is not None
needs_native = pytest.mark.skipif(not HAS_CC, reason="no C compiler (CC or cc) on this machine")
SHAPES = [(1,), (7,), (3, 5), (129,), (2, 3, 4)]


def torch_loop(current, tau, v_th, v_reset, soft, v_init=None, return_h=False):
    spikes, _, hs = cpu._lif_loop(lambda t, s: current[t], current.shape, current.dtype, tau, v_th, v_reset, soft,
                                  v_init, return_h)
    return spikes, hs


def currents(shape, seed, dyadic):
    """Normal currents, or multiples of 1/8 so that h lands exactly on v_th = 1.0 at times."""
    gen = torch.Generator().manual_seed(seed)
    if dyadic:
        return (torch.randint(-8, 17, shape, generator=gen) / 8).float()
    return torch.randn(shape, generator=gen) * 0.8 + 0.2


# No margin from the threshold is kept: the kernel computes the torch loop's float32 operations in the same order
# (compiled without FMA contraction), so h, and hence h >= v_th, is equal exactly, even at a tie.
@needs_native
@given(T=st.integers(1, 9), shape=st.sampled_from(SHAPES), soft=st.booleans(),
       v_reset=st.sampled_from([0.0, -0.1, 0.05]), tau=st.sampled_from([1.0, 2.0, 3.7]),
       v_th=st.sampled_from([0.3, 1.0]), seed=st.integers(0, 2**31 - 1), dyadic=st.booleans(),
       with_v_init=st.booleans(), return_h=st.booleans())
def test_native_is_bit_identical_to_torch_loop(T, shape, soft, v_reset, tau, v_th, seed, dyadic, with_v_init,
                                               return_h):
    current = currents((T, *shape), seed, dyadic)
    v_init = currents(shape, seed + 1, dyadic) * 0.5 if with_v_init else None
    assert native.accepts(current, v_init), native.available()[1]
    spikes, h = native.lif_forward(current, tau, v_th, v_reset, soft, v_init, return_h)
    ref_spikes, ref_h = torch_loop(current, tau, v_th, v_reset, soft, v_init, return_h)
    assert spikes.dtype == torch.uint8 and torch.equal(spikes, ref_spikes)
    assert (h is None) == (not return_h)
    if return_h:
        assert h.dtype == torch.float32 and torch.equal(h, ref_h)
    twin_spikes, twin_h = twin.lif_forward(current, tau, v_th, v_reset, soft, v_init, True)
    assert torch.equal(spikes, twin_spikes)
    if return_h:
        assert torch.equal(h, twin_h)


@needs_native
@pytest.mark.parametrize("soft", [False, True])
def test_exact_threshold_tie_fires_and_one_ulp_below_does_not(soft):
    v_th, tau = 0.3, 2.0
    tie = torch.tensor(v_th, dtype=torch.float32) * tau  # h = (I - 0) / 2 + 0 == float32(v_th) exactly
    below = torch.nextafter(tie, torch.tensor(0.0))
    current = torch.stack([tie, below]).reshape(1, 2).repeat(3, 1).contiguous()
    spikes, h = native.lif_forward(current, tau, v_th, 0.0, soft, None, True)
    assert h[0, 0] == torch.tensor(v_th, dtype=torch.float32) and spikes[0].tolist() == [1, 0]
    ref_spikes, ref_h = torch_loop(current, tau, v_th, 0.0, soft, None, True)
    assert torch.equal(spikes, ref_spikes) and torch.equal(h, ref_h)


@needs_native
def test_threaded_path_matches_over_block_edges():
    # 3 x 64 x 129 = 24768 values: above the kernel's threading cutoff, 8256 neurons end mid-block.
    current = currents((3, 64, 129), 5, False)
    ref = torch_loop(current, 2.0, 0.3, 0.0, False, None, True)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            spikes, h = cpu.lif_forward(current, 2.0, 0.3, 0.0, False, None, True)
            assert torch.equal(spikes, ref[0]) and torch.equal(h, ref[1])
    finally:
        torch.set_num_threads(threads)


def test_unsupported_inputs_take_the_torch_loop():
    current = currents((4, 6, 5), 1, False)
    for x in (current.double(), current.transpose(1, 2)):
        assert not native.accepts(x)
        spikes, h = cpu.lif_forward(x, 2.0, 0.3, 0.0, False, None, True)
        ref_spikes, ref_h = torch_loop(x, 2.0, 0.3, 0.0, False, None, True)
        assert torch.equal(spikes, ref_spikes) and torch.equal(h, ref_h)
    assert not native.accepts(current, torch.zeros(6, 5, dtype=torch.float64))


def test_disabled_by_env_falls_back_and_agrees(monkeypatch):
    current = currents((4, 3, 5), 2, False)
    monkeypatch.setenv("BSDGRAPH_NATIVE", "0")
    ok, reason = native.available()
    assert not ok and "BSDGRAPH_NATIVE=0" in reason and not native.accepts(current)
    spikes, h = cpu.lif_forward(current, 3.7, 0.3, -0.1, True, None, True)
    ref_spikes, ref_h = torch_loop(current, 3.7, 0.3, -0.1, True, None, True)
    assert torch.equal(spikes, ref_spikes) and torch.equal(h, ref_h)


@pytest.mark.parametrize("cc", ["/nonexistent", "false"])
def test_missing_or_failing_compiler_reports_unavailable(monkeypatch, tmp_path, cc):
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.warns(UserWarning, match="native LIF kernel unavailable"):
        ok, reason = native.available()
    assert not ok and cc in reason
    current = currents((2, 4), 3, False)
    spikes, _ = cpu.lif_forward(current, 2.0, 0.3, 0.0, False)
    assert torch.equal(spikes, torch_loop(current, 2.0, 0.3, 0.0, False)[0])
    assert list(tmp_path.rglob("*.tmp")) == []  # the failed build's temporary file is gone


# The cache's SHA-256 records. Each test copies a built cache to a new directory and damages the copy: a library
# this process has already loaded must not be truncated (its mapped pages would SIGBUS), and dlopen of a path it
# has loaded returns the old handle without reading the file again.
@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    seed = tmp_path_factory.mktemp("seed")
    lib, reason = native._build(os.environ.get("CC", "cc"), str(seed), "")
    assert lib is not None, reason
    return seed


@pytest.fixture
def cache(built_cache, tmp_path, monkeypatch):
    """A fresh copy of the built cache, as XDG_CACHE_HOME, with _build's memo cleared before and after."""
    shutil.copytree(built_cache, tmp_path, dirs_exist_ok=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native._build.cache_clear()
    yield tmp_path
    native._build.cache_clear()


def cached_library(cache):
    (so,) = (cache / "bsdgraph").glob("native_lif-*.so")
    return so


def count_compiles(monkeypatch):
    calls, real = [], native._compile
    monkeypatch.setattr(native, "_compile", lambda *args: calls.append(args) or real(*args))
    return calls


def assert_rebuilt_and_works(so, calls, caught):
    assert len(calls) == 1 and calls[0][2] == so
    assert native._sha256(so) == native._record(so).read_text().strip()
    assert any("damaged" in str(w.message) and "rebuilt" in str(w.message) for w in caught)
    current = currents((5, 3, 7), 4, True)
    assert native.accepts(current), native.available()[1]
    spikes, h = native.lif_forward(current, 2.0, 1.0, 0.0, False, None, True)
    ref_spikes, ref_h = torch_loop(current, 2.0, 1.0, 0.0, False, None, True)
    assert torch.equal(spikes, ref_spikes) and torch.equal(h, ref_h)
    assert list(so.parent.glob("*.tmp")) == []


def _truncate(so):
    os.truncate(so, so.stat().st_size // 2)


def _drop_record(so):
    native._record(so).unlink()


def _flip_a_byte(so):
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0x01  # same length: only the hash can tell
    so.write_bytes(bytes(data))


# Without the records the truncation case dies: dlopen of the half-length library SIGBUSes the process (seen by
# hand in a subprocess, exit -7, no message), which pytest reports as a crashed run.
@needs_native
@pytest.mark.parametrize("damage, why", [(_truncate, r"SHA-256 does not match its record"),
                                         (_drop_record, r"no SHA-256 record"),
                                         (_flip_a_byte, r"SHA-256 does not match its record")])
def test_a_damaged_library_is_rebuilt_not_loaded(cache, monkeypatch, damage, why):
    so = cached_library(cache)
    damage(so)
    calls = count_compiles(monkeypatch)
    with pytest.warns(UserWarning, match=rf"damaged \({why}\).*rebuilt") as caught:
        assert native.available()[0]
    assert_rebuilt_and_works(so, calls, caught)


@needs_native
def test_intact_cache_loads_without_compiling(cache, monkeypatch):
    monkeypatch.setattr(native, "_compile", lambda *args: pytest.fail(f"recompiled an intact cache: {args}"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.available()[0], native.available()[1]
    current = currents((4, 6), 6, False)
    assert torch.equal(native.lif_forward(current, 3.7, 0.3, -0.1, True)[0],
                       torch_loop(current, 3.7, 0.3, -0.1, True)[0])


@needs_native
def test_failed_rebuild_of_a_damaged_library_falls_back_to_the_torch_loop(cache, monkeypatch):
    so = cached_library(cache)
    os.truncate(so, so.stat().st_size // 2)
    monkeypatch.setattr(native, "_compile", lambda *args: "simulated compiler failure")
    with pytest.warns(UserWarning, match="native LIF kernel unavailable.*simulated compiler failure"):
        assert not native.available()[0]
    current = currents((2, 4), 3, False)
    assert torch.equal(cpu.lif_forward(current, 2.0, 0.3, 0.0, False)[0], torch_loop(current, 2.0, 0.3, 0.0, False)[0])
