"""Launching a Triton kernel with little host work (the kernels' host cost, issue 10).

On an H100 a decode attention call over a 2K context runs ~15 us on the GPU, and Triton's own
launch, ``kernel[grid](...)``, spends longer than that on the host before the GPU sees any of
it. On every call it binds the arguments by name, works out how each one specialises the
compiled code, reads its settings (``triton.knobs``: environment variables), formats them into
a cache key, looks the compiled kernel up in its cache, and only then calls the compiled
kernel's launcher, a small C function that packs the arguments and calls ``cuLaunchKernel``.
Called from a notebook, or in a step that is not replayed from a CUDA graph, that host time is
what the call costs.

``launch`` does the same lookup with a key that is cheap to build and then calls the same C
launcher directly (the call Triton's ``JITFunction.run`` ends in). The key holds everything
Triton specialises a compiled kernel on, so a hit is the kernel Triton would have picked:

* the constexprs and the launch options (``num_warps``, ``num_stages``, ...), as given;
* for each tensor argument its dtype. Triton also specialises a pointer on whether its address
  is a multiple of 16 bytes (it vectorises loads through aligned pointers): the key is built
  only when every address is, and a call with a misaligned one (a view that starts mid-row,
  rare) takes Triton's own launch, which works that out itself;
* every other argument (integers such as strides and lengths, floats) by its exact value: Triton
  specialises an integer on whether it is 1, a multiple of 16 or wider than 32 bits, all of which
  the value decides. Keying on the value is stricter than Triton, and cheaper to build than
  working those facts out in Python; the price is an entry per value, so the kernels here take
  no argument that changes with every call (the row width, not the token count; the split-K
  partition count takes a few values; the attention kernel's sequence count and block-table
  width take one per batch shape, and a first sight costs one ``kernel[grid]`` call). Booleans
  count as the integers they equal (no kernel here takes one at run time);
* the current CUDA device.

The first launch of a key goes through ``kernel[grid]``, which compiles (or finds) the kernel,
launches it and returns it; we keep it. Every later launch with that key costs one dictionary
lookup and the C call. Under the CPU interpreter (``TRITON_INTERPRET=1``, how the tests run the
kernels) there is no compiled kernel, and every launch goes through ``kernel[grid]``.

What the direct path gives up: Triton's launch hooks (``triton.knobs.runtime.launch_enter_hook``,
used by its ``proton`` profiler) are not called for it; CUDA-level profilers (Nsight, the torch
profiler) see its kernels as usual. It relies on the compiled kernel's launcher taking every
argument in the kernel's order, constexprs included, after the grid, stream, function,
packed metadata, launch metadata and the two hooks: true of Triton 3.3 to 3.9 (what minipaged
runs on). A Triton whose compiled kernel lacks that launcher gets the plain ``kernel[grid]``.

The kernels launched here take their tensors first, then their other runtime arguments, then
their constexprs, and are given every constexpr (none left to a default). Every tensor is on the
current CUDA device: the ops' argument checks see to it, and the direct path hands the launcher
bare addresses (where Triton's launch would ask the driver about each). ``launch`` checks the
order of runtime arguments and constexprs once per kernel, and counts the leading tensors of
its first call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on Python integers: grid arithmetic for a launch. (``triton.cdiv`` and
    ``triton.next_power_of_2`` are constexpr functions that cost microseconds outside a kernel.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


class _Kernel:
    """One ``@triton.jit`` function's compiled variants, found by ``launch``'s key."""

    def __init__(self, kernel: Any, args: Sequence[object]) -> None:
        num_args = len(args)
        self.num_tensors = next((i for i, arg in enumerate(args) if not isinstance(arg, Tensor)), num_args)
        self.kernel = kernel
        self.compiled: dict[tuple, Any] = {}
        params = getattr(kernel, "params", None)  # a JITFunction's; the interpreter's kernels have none
        if params is not None:
            names = [param.name for param in params]
            self.constexpr_names = [param.name for param in params if param.is_constexpr]
            if names[num_args:] != self.constexpr_names:
                raise ValueError(f"launch: {names} must list the runtime arguments first, then every constexpr")
        # Compiled kernels need CUDA; on a GPU this turns False if a launch returns none.
        self.direct = params is not None and torch.cuda.is_available()

    def key(self, device: int, args: Sequence[object], meta: dict[str, object]) -> tuple[tuple | None, list[int]]:
        """What picks the compiled kernel (see the module docstring), or None when an address is
        not 16-byte aligned; and the tensors' addresses."""
        tensors = args[: self.num_tensors]
        pointers = [tensor.data_ptr() for tensor in tensors]
        low_bits = 0
        for pointer in pointers:
            low_bits |= pointer
        if low_bits & 15:
            return None, pointers
        return (device, *meta.values(), *args[self.num_tensors :], *[tensor.dtype for tensor in tensors]), pointers

    def launch(self, grid: tuple[int, ...], args: Sequence[object], meta: dict[str, object]) -> None:
        if not self.direct:
            self.kernel[grid](*args, **meta)
            return
        device = torch.cuda.current_device()
        key, pointers = self.key(device, args, meta)
        found = None if key is None else self.compiled.get(key)
        if found is None:  # Triton compiles (or finds) it, launches it and hands it back
            compiled = self.kernel[grid](*args, **meta)
            if not all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
                self.direct = False
            elif key is not None:
                self.compiled[key] = compiled, [meta[name] for name in self.constexpr_names]
            return
        compiled, constexprs = found
        grid_0, grid_1, grid_2 = (*grid, 1, 1)[:3]
        stream = torch._C._cuda_getCurrentRawStream(device)  # what Triton's CUDA driver reads too
        # Tensors go in as their addresses: the launcher takes an integer as it is, where for a
        # tensor it would call data_ptr() and ask the driver whether the address is on the GPU.
        compiled.run(
            grid_0, grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, None, None, None,
            *pointers, *args[self.num_tensors :], *constexprs,
        )  # fmt: skip


_kernels: dict[Any, _Kernel] = {}


def launch(kernel: Any, grid: tuple[int, ...], args: Sequence[object], **meta: object) -> None:
    """``kernel[grid](*args, **meta)`` with the host work of a dictionary lookup and a C call.

    ``args`` are the kernel's runtime arguments in order; ``meta`` names every constexpr and
    any launch option (``num_warps=4``). See the module docstring for what is cached.
    """
    entry = _kernels.get(kernel)
    if entry is None:
        entry = _kernels[kernel] = _Kernel(kernel, args)
    entry.launch(grid, args, meta)
