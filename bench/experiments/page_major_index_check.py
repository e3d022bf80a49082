"""Desk check of the page-major decode kernel's index arithmetic, on the CPU (session 20, written
while no GPU was lent): its formulas restated in Python, then checked against the logical layout.

- the copy slots (csrc/include/kvcore/gqa_decode_page_major.cuh, issue_stage): every 16-byte
  chunk of a stage's 16 tokens x HEADS heads is copied once, to the shared offset the warps'
  ldmatrix reads then find it at (K non-transposed, V transposed); each ldmatrix phase of 8
  lanes touches 8 different bank groups; consecutive threads copy contiguous runs of the cache;
- the split merge (load_batch, the lse staging, split_merge_weights, the combine): emulated over
  random partials and checked against a direct weighted sum.

It does not run the kernel: decode_trace (PAGE_MAJOR=...) and the CUDA tests do that on a GPU.
Run: python bench/experiments/page_major_index_check.py
"""
import numpy as np


def swz(row, chunk):  # page_major_swz
    return (row * 16 + (chunk ^ (row & 7))) * 8


def check_copy(HEADS, HKV, hblk):
    D, TD, ROWS = 128, 16, 16
    THREADS = HEADS * 32
    LOADS = ROWS * HEADS * TD // THREADS
    ROW_STEP = THREADS // (HEADS * TD)
    row_stride = HKV * D
    HEAD_TILE = ROWS * D
    smem_src = {}  # smem element offset (of a 16-byte chunk) -> (token row, head, chunk)
    for tid in range(THREADS):
        copy_chunk, copy_head, row0 = tid % TD, (tid // TD) % HEADS, tid // (HEADS * TD)
        src_off = row0 * row_stride + (hblk * HEADS + copy_head) * D + copy_chunk * 8
        for j in range(LOADS):
            row = row0 + j * ROW_STEP
            s_off = copy_head * HEAD_TILE + swz(row, copy_chunk)
            g = src_off + j * ROW_STEP * row_stride
            tok, rem = divmod(g, row_stride)
            head, col = divmod(rem, D)
            assert col % 8 == 0
            assert s_off not in smem_src, "two copies to one chunk"
            smem_src[s_off] = (tok, head, col // 8)
            assert tok == row
    assert len(smem_src) == ROWS * HEADS * TD
    # coalescing: consecutive threads, same j -> consecutive 16 bytes within a token's run
    for j in range(LOADS):
        gs = []
        for tid in range(THREADS):
            copy_chunk, copy_head, row0 = tid % TD, (tid // TD) % HEADS, tid // (HEADS * TD)
            gs.append(row0 * row_stride + (hblk * HEADS + copy_head) * D + copy_chunk * 8 + j * ROW_STEP * row_stride)
        runs = sum(1 for a, b in zip(gs, gs[1:]) if b != a + 8) + 1
        assert runs <= ROW_STEP, (runs, ROW_STEP)  # a contiguous run per token row at most
    # K ldmatrix (non-trans): warp w, k-pair k, n-tile nt, lane -> row nt*8 + lane%8, chunk k*2 + lane//8
    for w in range(HEADS):
        for k in range(0, D // 16, 2):
            for nt in range(2):
                for lane in range(32):
                    off = w * HEAD_TILE + swz(nt * 8 + (lane & 7), k * 2 + (lane >> 3))
                    tok, head, ch = smem_src[off]
                    assert (tok, head, ch) == (nt * 8 + (lane & 7), hblk * HEADS + w, k * 2 + (lane >> 3))
        # V ldmatrix (trans): rows (lane & 7) + ((lane >> 3) & 1) * 8, chunk nd*2 + lane//16
        for nd in range(D // 16):
            for lane in range(32):
                off = w * HEAD_TILE + swz((lane & 7) + ((lane >> 3) & 1) * 8, nd * 2 + (lane >> 4))
                tok, head, ch = smem_src[off]
                assert (tok, head, ch) == ((lane & 7) + ((lane >> 3) & 1) * 8, hblk * HEADS + w, nd * 2 + (lane >> 4))
    # bank conflicts of one ldmatrix phase (8 lanes): 8 distinct 16-byte bank groups
    for w in range(HEADS):
        for k in range(0, D // 16, 2):
            for nt in range(2):
                for ph in range(4):
                    offs = [w * HEAD_TILE + swz(nt * 8 + (l & 7), k * 2 + (l >> 3)) for l in range(ph * 8, ph * 8 + 8)]
                    groups = {(o * 2 // 16) % 8 for o in offs}
                    assert len(groups) == 8


def check_merge(HEADS, group, ns, b=1, hblk=0, nblk_per_seq=2):
    D = 128
    THREADS = HEADS * 32
    brows = HEADS * group
    KB, SB = 4, 8
    blk = b * nblk_per_seq + hblk
    rng = np.random.default_rng(0)
    nblocks = 4 * nblk_per_seq
    partial_out = rng.standard_normal(nblocks * ns * brows * D).astype(np.float32)
    partial_lse = rng.standard_normal(nblocks * ns * brows).astype(np.float32)
    # kernel writes: slot = (blk * ns + split) * brows + warp * group + row
    # expected merge for head h (within block): sum_s w_s * P[s, h] / sum_s w_s
    P = partial_out.reshape(nblocks, ns, brows, D)[blk]
    L = partial_lse.reshape(nblocks, ns, brows)[blk]
    wts = np.exp2(L - L.max(axis=0))
    ref = (wts[:, :, None] * P).sum(0) / wts.sum(0)[:, None]
    out = np.full((brows, D), np.nan, np.float32)
    n_items = brows * (D // 4)
    kItemStride = (THREADS // (D // 4)) * D
    split_stride = brows * D
    # lse staging and weights
    wgt = np.zeros(brows * (ns + 1), np.float32)
    plse0 = blk * ns * brows
    for i in range(ns * brows):
        s, h = divmod(i, brows)
        wgt[h * (ns + 1) + s] = partial_lse[plse0 + i]
    for h in range(brows):
        vals = np.array([wgt[h * (ns + 1) + s] for s in range(ns)])
        base = vals.max()
        e = np.exp2(vals - base)
        for s in range(ns):
            wgt[h * (ns + 1) + s] = e[s]
        wgt[h * (ns + 1) + ns] = e.sum()
    for tid in range(THREADS):
        my_items = (n_items - tid + THREADS - 1) // THREADS if tid < n_items else 0
        pout = blk * ns * brows * D + (tid // (D // 4)) * D + (tid % (D // 4)) * 4
        for k0 in range(0, my_items, KB):
            acc = np.zeros((KB, 4), np.float64)
            for s0 in range(0, ns, SB):
                for kk in range(KB):
                    src = pout + (k0 + kk) * kItemStride + s0 * split_stride
                    for ss in range(SB):
                        if k0 + kk < my_items and s0 + ss < ns:
                            pv = partial_out[src:src + 4]
                            h = (tid + (k0 + kk) * THREADS) // (D // 4)
                            acc[kk] += wgt[h * (ns + 1) + s0 + ss] * pv
                        src += split_stride
            for kk in range(KB):
                if k0 + kk >= my_items: break
                item = tid + (k0 + kk) * THREADS
                h, c = item // (D // 4), (item % (D // 4)) * 4
                out[h, c:c + 4] = acc[kk] / wgt[h * (ns + 1) + ns]
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)



def main() -> None:
    for heads, hkv in [(8, 8), (4, 8), (2, 8), (2, 2), (4, 4)]:
        for hblk in range(hkv // heads):
            check_copy(heads, hkv, hblk)
    for heads in (8, 4, 2):
        for group in (1, 4, 8, 16):
            for ns in (2, 3, 8, 9, 20):
                check_merge(heads, group, ns)
    print("page-major index checks passed")


if __name__ == "__main__":
    main()
