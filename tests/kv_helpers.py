"""Helpers shared by the KV-cache tests."""

import torch

from minipaged.kv import ContiguousKVCache, KVCache, PagedKVCache


def snapshot(cache: KVCache) -> tuple:
    """Everything bookkeeping-related, to check that a failed call changed nothing."""
    common = (dict(cache._num_tokens), dict(cache._final_len), dict(cache._swapped))
    if isinstance(cache, PagedKVCache):
        pools = []
        for pool in (cache.pool, cache.cpu_pool):
            a = pool.allocator
            pools.append(({s: list(t) for s, t in pool.tables.items()}, list(a.ref_counts), list(a.free_list),
                          a.num_shared))
        p = cache.prefix_cache
        prefix = (list(p.evictable), dict(p.cached), dict(p.block_hash),
                  {s: list(t) for s, t in p.seq_tokens.items()}, {s: list(h) for s, h in p.seq_hashes.items()})
        return common + (*pools, *prefix)
    assert isinstance(cache, ContiguousKVCache)
    swapped = {s: size for s, (size, _) in cache._swap_space.items()}
    return common + (dict(cache.slabs), cache.buddy.free_blocks(), dict(cache.buddy.live), swapped)


def token_kv(token_ids: list[int], positions: list[int], num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Deterministic K (or V) rows for tokens: what a model would compute from (token, position)."""
    t = torch.tensor(token_ids, dtype=torch.float32)[:, None, None]
    p = torch.tensor(positions, dtype=torch.float32)[:, None, None]
    h = torch.arange(num_kv_heads, dtype=torch.float32)[None, :, None]
    d = torch.arange(head_dim, dtype=torch.float32)[None, None, :]
    return t * 1000 + p + h * 0.25 + d * 0.0625
