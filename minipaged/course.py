"""What every notebook of the course reads first: the small-mode switch and the machine it ran on.

The notebooks run at full size on a GPU and, shrunk, on a CPU (CI executes them that way so
they never rot). ``SMALL`` is read here and only here; a notebook uses it to pick *sizes*
(how many requests, how long, which model shape), never to take another code path.

``MINIPAGED_SMALL=1`` forces small mode, ``MINIPAGED_SMALL=0`` forces full size; unset, small
mode is on exactly when no CUDA GPU is present.
"""

from __future__ import annotations

import os
import platform

import torch


def _small_mode() -> bool:
    value = os.environ.get("MINIPAGED_SMALL")
    if value is None:
        return not torch.cuda.is_available()
    if value not in ("0", "1"):
        raise ValueError(f"MINIPAGED_SMALL must be 0 or 1, got {value!r}")
    return value == "1"


SMALL: bool = _small_mode()


def sized(full, small):
    """``small`` in small mode, else ``full``: the one way a notebook picks a size."""
    return small if SMALL else full


def machine() -> str:
    """One line naming where this ran: the GPU (or the CPU), and the versions that matter."""
    import transformers
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    mode = "small mode" if SMALL else "full size"
    return (f"{device}; torch {torch.__version__}, triton {triton.__version__}, "
            f"transformers {transformers.__version__}; {mode}")
