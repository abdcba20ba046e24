"""The two KV caches side by side (paper §3 vs §4): contiguous slabs and paged blocks."""

from minipaged.kv.accounting import MemoryBreakdown
from minipaged.kv.base import KVCache, KVCacheFull
from minipaged.kv.buddy import BuddyAllocator
from minipaged.kv.contiguous import ContiguousKVCache
from minipaged.kv.paged import BlockAllocator, PagedKVCache

__all__ = [
    "BlockAllocator",
    "BuddyAllocator",
    "ContiguousKVCache",
    "KVCache",
    "KVCacheFull",
    "MemoryBreakdown",
    "PagedKVCache",
]
