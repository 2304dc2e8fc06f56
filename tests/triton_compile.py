"""Compiling a Triton kernel for an NVIDIA GPU (sm_90, the H100/H200) without one: Triton's own
front end and ptxas, no driver. The interpreter tests check a kernel's numbers; this checks that the
compiler, which accepts less than the interpreter, builds it."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import pytest


def compile_for_sm90(kernel: Any, types: Mapping[str, str], constexprs: Mapping[str, Any]) -> Any:
    """``kernel`` (a ``triton.jit`` function) compiled for sm_90: ``types`` names the Triton types of
    its pointer and float arguments (the rest are i32), ``constexprs`` its compile-time values. Skips
    the test where Triton or its CUDA backend (ptxas) is missing."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # another Triton layout: nothing to check against
        pytest.skip(f"Triton {triton.__version__} lacks the ASTSource / GPUTarget API: {e}")
    names = inspect.signature(kernel.fn).parameters
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    try:
        return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=dict(constexprs)),
                              target=GPUTarget("cuda", 90, 32))  # fmt: skip
    except (FileNotFoundError, RuntimeError) as e:
        if "ptxas" in str(e):
            pytest.skip(f"no ptxas for Triton's CUDA backend: {e}")
        raise
