"""minipaged: PagedAttention (Kwon et al., SOSP 2023) built small enough to read.

``minipaged.kv`` holds the two KV caches side by side, ``minipaged.ops`` the attention and cache
kernels (Triton beside plain PyTorch), ``minipaged.model`` a Llama-family transformer over either
cache, ``minipaged.engine`` the scheduler and the ``LLM`` facade, ``minipaged.workloads`` and
``minipaged.experiments`` the traces and the paper's charts.
"""

from minipaged.engine import LLM, BeamSearchParams, SamplingParams

__all__ = ["LLM", "BeamSearchParams", "SamplingParams"]
__version__ = "0.1.0"
