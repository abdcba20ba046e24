"""The paper's memory charts, re-drawn by the real caches with known output lengths.

Every experiment drives `minipaged.kv` through one serving loop (`serve.py`) and writes a CSV
and a PNG: `fragmentation` (Figure 2), `batching` (Figure 13), `block_size` (Figure 18b, memory
side), `timeline` (Figure 2 over time). `python -m minipaged.experiments --out figures` runs
them all; `kernel_bench` (GPU) times the attention kernels (Figure 18a).
"""
