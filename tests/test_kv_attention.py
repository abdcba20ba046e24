"""The caches hand the kernels what they need through one object: the same sequences held
contiguously and in pages attend to the same result, in decode and in prefill, through
``cache.attention_metadata`` and ``ops.attention`` (block tables for the paged cache, slab starts
for the contiguous one), and the engine never asks which cache it holds."""

import pytest
import torch

from minipaged import ops
from minipaged.kv import ContiguousKVCache, PagedKVCache

HEADS, KV_HEADS, DIM = 4, 2, 64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def filled_caches(lengths: dict[int, int], gen: torch.Generator) -> tuple[PagedKVCache, ContiguousKVCache]:
    """Both caches holding the same random K/V for sequences of the given lengths."""
    kw = dict(num_kv_heads=KV_HEADS, head_dim=DIM, dtype=torch.float32, device=DEVICE, max_seq_len=64)
    paged = PagedKVCache(24, 4, **kw)
    contiguous = ContiguousKVCache(256, "oracle", **kw)
    paged.allocate(99, 7)  # a sequence that comes and goes, so the tables are not 0, 1, 2, ...
    for seq_id, n in lengths.items():
        for cache in (paged, contiguous):
            cache.allocate(seq_id, n - 1, final_len=n)
            cache.append_slots(seq_id)
        if seq_id == 0:
            paged.free(99)
        k = torch.randn(n, KV_HEADS, DIM, generator=gen).to(DEVICE)
        v = torch.randn(n, KV_HEADS, DIM, generator=gen).to(DEVICE)
        for cache in (paged, contiguous):
            cache.write(0, cache.slot_mapping(seq_id), k, v)
    return paged, contiguous


def plain_attention(cache, seq_id: int, q: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last ``len(q)`` positions over the K/V read back from the cache."""
    k, v = cache.read(seq_id, 0)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) * DIM**-0.5
    query_pos = torch.arange(k.shape[0] - q.shape[0], k.shape[0], device=q.device)
    scores = scores.masked_fill(torch.arange(k.shape[0], device=q.device) > query_pos[:, None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("num_new", [[1, 1, 1], [3, 1, 13]], ids=["decode", "prefill"])
def test_paged_and_contiguous_caches_give_the_same_attention(num_new):
    gen = torch.Generator().manual_seed(0)
    lengths = {0: 13, 1: 2, 2: 30}
    paged, contiguous = filled_caches(lengths, gen)
    assert paged.block_table(2) != list(range(len(paged.block_table(2))))  # really scattered
    ids = list(lengths)
    q = torch.randn(sum(num_new), HEADS, DIM, generator=gen).to(DEVICE)
    outs = []
    for cache in (paged, contiguous):
        metadata = cache.attention_metadata(ids, num_new)
        assert metadata.is_decode == (num_new == [1, 1, 1])
        assert (metadata.block_tables is None) == (cache is contiguous)
        assert (metadata.starts is None) == (cache is paged)
        assert metadata.max_context_len == 30 and metadata.max_query_len == max(num_new)
        # The slots of the new tokens are those the cache maps their positions to.
        expected = torch.cat([cache.slot_mapping(s, lengths[s] - n) for s, n in zip(ids, num_new)])
        assert metadata.slot_mapping.tolist() == expected.tolist()
        outs.append(ops.attention(q, cache.k_caches[0], cache.v_caches[0], metadata))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    # And both equal plain attention over the K/V read back from the cache.
    first = 0
    for seq_id, n in zip(ids, num_new):
        rows = slice(first, first + n)
        torch.testing.assert_close(outs[0][rows], plain_attention(paged, seq_id, q[rows]), rtol=1e-4, atol=1e-4)
        first += n


def test_the_block_tables_handed_to_the_kernels_are_the_lists_padded():
    """The paged cache keeps its tables twice: as lists (what it reasons with) and as rows of one
    array (what a step hands the kernels, ``TableRows``). They agree after allocations, frees,
    a fork with copy-on-write, a swap out and back, and appends across block boundaries, for more
    sequences than the array first has rows for."""
    cache = PagedKVCache(200, 4, max_seq_len=64, num_cpu_blocks=40)
    for seq_id in range(40):
        cache.allocate(seq_id, 1 + seq_id % 9)
    for seq_id in range(0, 40, 3):
        cache.free(seq_id)
    cache.fork(1, 100)
    assert cache.append_slots(100, 2)  # sequence 1's last block is shared and partly filled: copied
    cache.swap_out([2])
    cache.swap_in([2])
    for seq_id in cache.seq_ids:
        cache.append_slots(seq_id, 4)
    ids = cache.seq_ids
    metadata = cache.attention_metadata(ids, [1] * len(ids))
    width = max(len(cache.block_table(seq_id)) for seq_id in ids)
    padded = [cache.block_table(seq_id) + [0] * (width - len(cache.block_table(seq_id))) for seq_id in ids]
    assert metadata.block_tables.tolist() == padded
    assert metadata.context_lens.tolist() == [cache.num_tokens(seq_id) for seq_id in ids]
    assert metadata.slot_mapping.tolist() == [cache.slot_mapping(s, cache.num_tokens(s) - 1).item() for s in ids]


def test_attention_metadata_rejects_bad_requests_and_changes_nothing():
    paged, _ = filled_caches({0: 5}, torch.Generator().manual_seed(0))
    before = paged.block_table(0)
    for seq_ids, num_new, match in [
        ([], [], "at least one"),
        ([0], [1, 1], "entries"),
        ([0], [6], "1..5"),
        ([0], [0], "1..5"),
        ([7], [1], "not in the cache"),
    ]:
        with pytest.raises(ValueError, match=match):
            paged.attention_metadata(seq_ids, num_new)
    assert paged.block_table(0) == before


def test_attention_checks_that_q_matches_the_metadata():
    paged, _ = filled_caches({0: 5, 1: 3}, torch.Generator().manual_seed(0))
    decode = paged.attention_metadata([0, 1], [1, 1])
    prefill = paged.attention_metadata([0, 1], [2, 1])
    with pytest.raises(ValueError, match="one each"):
        ops.attention(torch.zeros(3, HEADS, DIM, device=DEVICE), paged.k_caches[0], paged.v_caches[0], decode)
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.attention(torch.zeros(2, HEADS, DIM, device=DEVICE), paged.k_caches[0], paged.v_caches[0], prefill)


def test_to_device_many_packs_lists_into_aligned_views_of_one_buffer():
    """One copy for a step's index lists: each comes back with its values and dtype, at a
    16-byte-aligned address (Triton compiles a kernel per alignment of its pointers, and only
    vectorises loads through aligned ones), all in one device buffer."""
    from minipaged.ops.metadata import to_device_many

    columns = [
        ([3, -1, 7], torch.int64),
        ([5], torch.int32),
        ([], torch.int32),
        ([1, 2, 3, 4, 5], torch.int32),
        ([0.5, 2.0], torch.float64),
    ]
    tensors = to_device_many(columns, torch.device(DEVICE))
    for tensor, (values, dtype) in zip(tensors, columns, strict=True):
        assert tensor.dtype == dtype and tensor.tolist() == values and tensor.device.type == DEVICE
        assert tensor.data_ptr() % 16 == 0
    storages = {tensor.untyped_storage().data_ptr() for tensor in tensors}
    assert len(storages) == 1
