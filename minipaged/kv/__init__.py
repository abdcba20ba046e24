"""The two KV caches side by side (paper §3 vs §4): contiguous slabs and paged blocks."""

from minipaged.kv.accounting import MemoryBreakdown
from minipaged.kv.base import KVCache, KVCacheFull
from minipaged.kv.block_allocator import BlockAllocator
from minipaged.kv.buddy import BuddyAllocator
from minipaged.kv.contiguous import ContiguousKVCache
from minipaged.kv.paged import PagedKVCache
from minipaged.kv.prefix_cache import PrefixCache

__all__ = [
    "BlockAllocator",
    "BuddyAllocator",
    "ContiguousKVCache",
    "KVCache",
    "KVCacheFull",
    "MemoryBreakdown",
    "PagedKVCache",
    "PrefixCache",
]
