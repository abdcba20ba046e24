"""The caches hand the kernels what they need: the same sequences held contiguously and in pages
attend to the same result (block tables for the paged cache, slab starts for the contiguous one)."""

import torch

from minipaged import ops
from minipaged.kv import ContiguousKVCache, PagedKVCache

HEADS, KV_HEADS, DIM = 4, 2, 64


def test_paged_and_contiguous_caches_give_the_same_attention():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(num_kv_heads=KV_HEADS, head_dim=DIM, dtype=torch.float32, device=device, max_seq_len=64)
    paged = PagedKVCache(24, 4, **kw)
    contiguous = ContiguousKVCache(256, "oracle", **kw)
    gen = torch.Generator().manual_seed(0)
    lengths = {0: 13, 1: 2, 2: 30}
    paged.allocate(99, 7)  # a sequence that comes and goes, so the tables are not 0, 1, 2, ...
    for seq_id, n in lengths.items():
        for cache in (paged, contiguous):
            cache.allocate(seq_id, n - 1, final_len=n)
        paged.append_slots(seq_id)
        contiguous.append_slots(seq_id)
        if seq_id == 0:
            paged.free(99)
        k = torch.randn(n, KV_HEADS, DIM, generator=gen).to(device)
        v = torch.randn(n, KV_HEADS, DIM, generator=gen).to(device)
        for cache in (paged, contiguous):
            cache.write(0, cache.slot_mapping(seq_id), k, v)
    ids = list(lengths)
    q = torch.randn(len(ids), HEADS, DIM, generator=gen).to(device)
    context_lens = torch.tensor([lengths[i] for i in ids], dtype=torch.int32, device=device)
    out_paged = ops.paged_decode_attention(
        q, paged.k_caches[0], paged.v_caches[0], paged.block_tables_tensor(ids), context_lens
    )
    out_contiguous = ops.contiguous_decode_attention(
        q, contiguous.k_caches[0], contiguous.v_caches[0], contiguous.starts(ids), context_lens
    )
    assert paged.block_table(2) != list(range(len(paged.block_table(2))))  # really scattered
    torch.testing.assert_close(out_paged, out_contiguous, rtol=1e-5, atol=1e-5)
    # And both equal plain attention over the K/V read back from the cache.
    for row, seq_id in enumerate(ids):
        k, v = paged.read(seq_id, 0)
        k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", q[row], k) * DIM**-0.5, dim=-1)
        torch.testing.assert_close(out_paged[row], torch.einsum("hl,lhd->hd", probs, v), rtol=1e-4, atol=1e-4)
