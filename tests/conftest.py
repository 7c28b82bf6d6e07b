"""Test-wide set-up.

TRITON_INTERPRET must be in the environment before any ``@triton.jit`` decorator runs (Triton reads it when
the kernel object is created), so it is set here, at conftest import time, before any test module imports
``kernels``. On a machine with a CUDA GPU the kernels run natively instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# Interpreted kernels are slow and shared CI machines are noisy: no per-example deadline, few examples by
# default; `HYPOTHESIS_PROFILE=long` for a deeper search.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
