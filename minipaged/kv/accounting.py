"""Where the KV-cache memory goes: the paper's Figure 2 categories, counted the same way for both caches.

Paper §3 (Figure 2 and Figure 3) splits the KV space of a serving system into the slots that
hold real token states and three kinds of waste. minipaged counts every slot of the KV space
into exactly one of five categories, so they always add up to the cache's capacity:

token_states
    Slots that hold the key/value of a token right now. A physical slot shared by several
    sequences (a forked block) is counted once.
reservation
    Allocated slots that hold nothing yet but *will* hold a token before the request ends,
    i.e. slots reserved for tokens the request has yet to produce. Knowing this needs the
    request's true final length (``final_len``), which the experiments know; without it a
    cache assumes the request fills everything it has allocated so far (for the paged cache:
    its current blocks).
internal_fragmentation
    Allocated slots that will *never* hold a token: a contiguous slab reserved beyond the
    request's true length (policy ``max`` or ``pow2``), or the tail of a paged sequence's last
    block past its final length.
external_fragmentation
    Free slots that cannot serve the next waiting request. For the contiguous cache these are
    the free buddy blocks smaller than the aligned block that request's slab needs; for the
    paged cache, all free blocks when there are fewer than its prompt needs (any free block
    serves any request, so paging only "fragments" when memory is simply too full; prefix-cache
    hits are not taken into account). Zero when no request is waiting.
free
    All other free slots. In the paged cache these include cached blocks that no sequence
    references any more: they still hold K/V for the prefix cache, but any allocation may
    take them.

Each cache describes its allocated memory as a list of :class:`Extent` (a contiguous slab per
sequence, or one physical block) and its free memory as two numbers; :func:`breakdown` does the
arithmetic for both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MemoryBreakdown:
    """Slots of the KV space in each of the paper's categories (they sum to the capacity)."""

    token_states: int
    reservation: int
    internal_fragmentation: int
    external_fragmentation: int
    free: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def percentages(self) -> dict[str, float]:
        """Each category as a percentage of the whole KV space."""
        return {name: 100.0 * slots / self.total for name, slots in asdict(self).items()}


@dataclass(frozen=True)
class Extent:
    """A piece of allocated KV memory: ``slots`` slots, ``filled`` of them holding a token now,
    ``will_fill`` of them holding one by the time its request ends (filled <= will_fill <= slots)."""

    slots: int
    filled: int
    will_fill: int


def breakdown(extents: Iterable[Extent], free_slots: int, servable_free_slots: int) -> MemoryBreakdown:
    """Add up extents and free space into a :class:`MemoryBreakdown`.

    ``servable_free_slots`` is the part of ``free_slots`` that could serve the next waiting
    request (all of it when none waits); the rest is external fragmentation.
    """
    token_states = reservation = internal = 0
    for extent in extents:
        token_states += extent.filled
        reservation += extent.will_fill - extent.filled
        internal += extent.slots - extent.will_fill
    return MemoryBreakdown(
        token_states=token_states,
        reservation=reservation,
        internal_fragmentation=internal,
        external_fragmentation=free_slots - servable_free_slots,
        free=servable_free_slots,
    )
