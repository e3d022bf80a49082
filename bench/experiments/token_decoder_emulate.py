"""Line-by-line numpy emulation of csrc/include/kvcore/token_decoder_attention.cuh (the tensor-core
kernel) and of its launcher's sizing, to check the index math without a GPU.

It reproduces, per CTA and work item: the cp.async copies (flat vector -> (row, chunk), the XOR
swizzle, the shared-memory offsets; every destination written once, inside its stage), and per
warp unit the ldmatrix row addresses of every lane (including the zero row), the fragment
layouts of ldmatrix / ldmatrix.trans / mma.m16n8k16 (operands rounded to the input dtype, fp32
accumulation), the masking and online softmax, and the epilogue's out / lse addresses. The
result is compared with kvcore.reference.token_decoder_attention, and every out / lse element
must be written exactly once.

    PYTHONPATH=python python bench/experiments/token_decoder_emulate.py
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

try:
    from kvcore import reference
except ImportError:  # no built extension: the reference is plain torch, load it on its own
    import importlib.util
    import pathlib

    _spec = importlib.util.spec_from_file_location(
        "kvcore_reference", pathlib.Path(__file__).resolve().parents[2] / "python" / "kvcore" / "reference.py")
    reference = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(reference)

WARPS = 4
CONFLICTS: dict[int, int] = {}  # ldmatrix phases by bank-conflict ways (1 = conflict-free)
ITEM_BYTES = 32 * 1024


def fast_div(n: int, d: int) -> int:
    # The kernel's multiply-high division, bit-exact.
    s = 0
    while (1 << s) < d:
        s += 1
    m = ((1 << 32) * ((1 << s) - d)) // d + 1
    m &= 0xFFFFFFFF
    return (((n * m) >> 32) + n) >> s


def bf16_round(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).bfloat16().float().numpy()


def plan(n_blocks, L, P, Hq, Hkv, D, sms=4, per_sm=2):
    G = Hq // Hkv
    keys = P + L
    head_elems = (L * G + 2 * keys) * D
    hc = 1
    for c in range(1, Hkv + 1):
        if Hkv % c == 0 and c * head_elems * 2 <= ITEM_BYTES:
            hc = c
    lg = L * G
    hp, nkp = 1, 8
    while nkp < keys:
        nkp *= 2
    if lg <= 8:
        lgp = 1
        while lgp < lg:
            lgp *= 2
        hp = 16 // lgp
        while hp > 1 and hp * nkp > 32:
            hp //= 2
        while hp > 1 and hp // 2 >= hc:
            hp //= 2
    m_tiles = 1 if hp > 1 else (lg + 15) // 16
    head_groups = (hc + hp - 1) // hp
    dsplit = 2 if head_groups * m_tiles <= WARPS // 2 else 1
    row_shift = (16 // hp).bit_length() - 1 if hp > 1 else 30
    key_shift = nkp.bit_length() - 1 if hp > 1 else 30
    smem3 = 2 * (hc * head_elems * 3 + D) + 16
    stages = 3 if smem3 <= 100 * 1024 else 2
    chunks = Hkv // hc
    items = n_blocks * chunks
    slots = sms * per_sm
    per_cta = (items + slots - 1) // slots
    grid = (items + per_cta - 1) // per_cta
    return dict(G=G, keys=keys, hc=hc, hp=hp, row_shift=row_shift, key_shift=key_shift, head_groups=head_groups,
                m_tiles=m_tiles, dsplit=dsplit, stages=stages, chunks=chunks, items=items,
                per_cta=per_cta, grid=grid, stage_elems=hc * head_elems)


def ldmatrix(smem: np.ndarray, addrs: list[int], trans: bool) -> np.ndarray:
    """x4: lane l gives the address of row l % 8 of matrix l // 8. Returns regs[lane][m] as the
    two 16-bit elements (lo, hi) of each 32-bit register: [32, 4, 2]."""
    for m in range(4):  # shared-memory wavefronts of this 8-row phase: distinct rows on one bank group
        groups: dict[int, set] = {}
        for r in range(8):
            groups.setdefault((addrs[m * 8 + r] * 2 // 16) % 8, set()).add(addrs[m * 8 + r])
        ways = max(len(x) for x in groups.values())
        CONFLICTS[ways] = CONFLICTS.get(ways, 0) + 1
    mats = np.stack([np.stack([smem[addrs[m * 8 + r] : addrs[m * 8 + r] + 8] for r in range(8)]) for m in range(4)])
    out = np.zeros((32, 4, 2), dtype=np.float32)
    for t in range(32):
        for m in range(4):
            mat = mats[m].T if trans else mats[m]
            out[t, m] = mat[t // 4, 2 * (t % 4) : 2 * (t % 4) + 2]
    return out


def mma(d: np.ndarray, a: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> None:
    """d [32, 4] += A (16x16) B (16x8) with the m16n8k16 fragment layouts; a [32, 4, 2], b* [32, 2]."""
    A = np.zeros((16, 16), np.float32)
    B = np.zeros((16, 8), np.float32)
    for t in range(32):
        g, c = t // 4, 2 * (t % 4)
        A[g, c : c + 2] = a[t, 0]
        A[g + 8, c : c + 2] = a[t, 1]
        A[g, c + 8 : c + 10] = a[t, 2]
        A[g + 8, c + 8 : c + 10] = a[t, 3]
        B[c : c + 2, g] = b0[t]
        B[c + 8 : c + 10, g] = b1[t]
    C = A.astype(np.float64) @ B.astype(np.float64)
    for t in range(32):
        g, c = t // 4, 2 * (t % 4)
        d[t, 0] += C[g, c]
        d[t, 1] += C[g, c + 1]
        d[t, 2] += C[g + 8, c]
        d[t, 3] += C[g + 8, c + 1]


def emulate(q, k, v, block_lens, scale, sms=4, per_sm=2):
    N, L, Hq, D = q.shape
    P = k.shape[1] - L
    Hkv = k.shape[2]
    pl = plan(N, L, P, Hq, Hkv, D, sms, per_sm)
    G, KJ, HC, MT, DSPLIT, S = pl["G"], pl["keys"], pl["hc"], pl["m_tiles"], pl["dsplit"], pl["stages"]
    HCG, LG, TD, DW = HC * G, L * G, D // 8, D // pl["dsplit"]
    qf, kf, vf = (x.reshape(-1).float().numpy() for x in (q, k, v))
    qs, ks, vs = L * Hq * D, KJ * Hkv * D, KJ * Hkv * D
    out = np.full(N * L * Hq * D, np.nan, np.float32)
    lse = np.full(N * L * Hq, np.nan, np.float32)
    written = np.zeros(out.shape, np.int32)
    lwritten = np.zeros(lse.shape, np.int32)
    stage_elems = pl["stage_elems"]
    smem = np.full(S * stage_elems + D, np.nan, np.float32)
    zero_row = S * stage_elems
    smem[zero_row:] = 0.0
    HP, row_shift, key_shift = pl["hp"], pl["row_shift"], pl["key_shift"]
    row_mask, key_mask = (1 << row_shift) - 1, (1 << key_shift) - 1
    k_off, v_off = L * HCG * D, L * HCG * D + KJ * HC * D
    scale_log2 = np.float32(scale * 1.4426950408889634)
    stage_len = [0] * S

    def exact_unit(smem, sq, sk, sv, block, chunk, hb, row0, dpart, blen, out, lse, written, lwritten):
        QPL, OPL = D // 32, DW // 32
        for t in range(16):
            rr = row0 + t
            rl, hh = rr & row_mask, hb + (rr >> row_shift)
            if rl >= LG or hh >= HC:
                continue
            i = fast_div(rl, G)
            g = rl - i * G
            orow = (block * L + i) * Hq + (chunk * HC + hh) * G + g
            cols = [dpart * DW + lane * OPL + e for lane in range(32) for e in range(OPL)]
            if i >= blen:
                for c in cols:
                    out[orow * D + c] = 0.0
                    written[orow * D + c] += 1
                if dpart == 0:
                    lse[orow] = -np.inf
                    lwritten[orow] += 1
                continue

            def row_elems(base, key):  # the D logical elements of a swizzled shared row
                return np.concatenate([smem[base + ((c ^ (key & 7)) << 3) : base + ((c ^ (key & 7)) << 3) + 8]
                                       for c in range(TD)])

            qv = row_elems(sq + (i * HCG + hh * G + g) * D, rr)
            m, l_, acc = -np.inf, np.float32(0.0), np.zeros(D, np.float32)
            with np.errstate(invalid="ignore"):
                for j in range(P + i + 1):
                    kv_ = row_elems(sk + (j * HC + hh) * D, j)
                    x = np.float32(np.dot(qv.astype(np.float64), kv_.astype(np.float64))) * scale_log2
                    mx = np.fmax(m, x)
                    base = 0.0 if mx == -np.inf else mx
                    alpha, w = np.exp2(np.float32(m - base)), np.exp2(np.float32(x - base))
                    m = mx
                    l_ = l_ * alpha + w
                    acc = w * row_elems(sv + (j * HC + hh) * D, j) + acc * alpha
            inv = 0.0 if l_ == 0 else 1.0 / l_
            for c in cols:
                out[orow * D + c] = acc[c] * inv
                written[orow * D + c] += 1
            if dpart == 0:
                lse[orow] = -np.inf if l_ == 0 else (m + np.log2(l_)) * math.log(2)
                lwritten[orow] += 1

    for cta in range(pl["grid"]):
        first = cta * pl["per_cta"]
        last = min(pl["items"], first + pl["per_cta"])

        def prefetch(item, stage):
            if item >= last:
                return
            block = fast_div(item, pl["chunks"])
            chunk = item - block * pl["chunks"]
            dst = stage * stage_elems
            seen = np.zeros(stage_elems, np.int32)
            smem[dst : dst + stage_elems] = np.nan  # a stage holds only this item's copies
            qbase = block * qs + chunk * HCG * D
            for tid in range(WARPS * 32):
                col = tid & (TD - 1)
                for r in range(tid // TD, L * HCG, WARPS * 32 // TD):
                    i = fast_div(r, HCG)
                    h = r - i * HCG
                    hh = fast_div(h, G)
                    key = ((hh & (HP - 1)) << row_shift) + i * G + (h - hh * G)
                    off = r * D + ((col ^ (key & 7)) << 3)
                    assert 0 <= off and off + 8 <= k_off
                    src = qbase + col * 8 + (i * Hq + h) * D
                    assert block * qs <= src and src + 8 <= (block + 1) * qs
                    smem[dst + off : dst + off + 8] = qf[src : src + 8]
                    seen[off : off + 8] += 1
                for arr, region, stride in ((kf, k_off, ks), (vf, v_off, vs)):
                    base = block * stride + chunk * HC * D + col * 8
                    for r in range(tid // TD, KJ * HC, WARPS * 32 // TD):
                        j = fast_div(r, HC)
                        off = region + r * D + ((col ^ (j & 7)) << 3)
                        assert region <= off and off + 8 <= region + KJ * HC * D
                        src = base + (j * Hkv + (r - j * HC)) * D
                        assert block * stride <= src and src + 8 <= (block + 1) * stride
                        smem[dst + off : dst + off + 8] = arr[src : src + 8]
                        seen[off : off + 8] += 1
            assert (seen == 1).all(), "a stage element copied twice or never"
            stage_len[stage] = int(block_lens[block]) if block_lens is not None else L

        for s in range(S - 1):
            prefetch(first + s, s)
        stage = 0
        for item in range(first, last):
            prefetch(item + S - 1, S - 1 if stage == 0 else stage - 1)
            block = fast_div(item, pl["chunks"])
            chunk = item - block * pl["chunks"]
            blen = min(max(stage_len[stage], 0), L)
            sq = stage * stage_elems
            sk, sv = sq + k_off, sq + v_off
            for u in range(pl["head_groups"] * MT * DSPLIT):
                dpart = u % DSPLIT
                hm = u // DSPLIT
                hg, mt = hm // MT, hm % MT
                hb = hg * HP
                row0 = mt * 16
                heads = min(HP, HC - hb)
                i_first = fast_div(row0, G)
                i_last = min(fast_div(min(row0 + 15, LG - 1), G), blen - 1)
                n_x = ((heads - 1) << key_shift) + P + i_last + 1 if i_last >= i_first else 0
                # Inf/NaN in the V rows of the unit's heads and columns: the exact path.
                CW = DW // 8
                bad = False
                for sub in range(heads):
                    for j in range(KJ):
                        for c in range(CW):
                            at = sv + (j * HC + hb + sub) * D + (((dpart * CW + c) ^ (j & 7)) << 3)
                            bad |= not np.isfinite(smem[at : at + 8]).all()
                if bad:
                    exact_unit(smem, sq, sk, sv, block, chunk, hb, row0, dpart, blen, out, lse, written, lwritten)
                    continue
                a_row, a_key = [], []
                x_lo, x_hi = np.zeros((32, 2), np.int64), np.zeros((32, 2), np.int64)
                for lane in range(32):
                    rr = row0 + (lane & 7) + ((lane >> 3) & 1) * 8
                    rl, hh = rr & row_mask, hb + (rr >> row_shift)
                    a_key.append(rr)
                    if rl < LG and hh < HC:
                        i = fast_div(rl, G)
                        a_row.append(sq + (i * HCG + hh * G + (rl - i * G)) * D)
                    else:
                        a_row.append(zero_row)
                    for half in range(2):
                        r = row0 + (lane >> 2) + 8 * half
                        rl, sub = r & row_mask, r >> row_shift
                        i = fast_div(rl, G)
                        x_lo[lane, half] = sub << key_shift
                        ok = rl < LG and hb + sub < HC and i < blen
                        x_hi[lane, half] = x_lo[lane, half] + P + i if ok else x_lo[lane, half] - 1
                m = np.full((32, 2), -np.inf, np.float32)
                l = np.zeros((32, 2), np.float32)
                o = np.zeros((DW // 8, 32, 4), np.float32)
                for j0 in range(0, n_x, 16):
                    s_ = np.zeros((2, 32, 4), np.float32)
                    second = j0 + 8 < n_x
                    jb = [[min((j0 + nt * 8 + (t & 7)) & key_mask, KJ - 1) for t in range(32)] for nt in range(2)]
                    hk = [[min(hb + ((j0 + nt * 8 + (t & 7)) >> key_shift), HC - 1) for t in range(32)] for nt in range(2)]
                    for kc in range(0, D // 16, 2):
                        a0 = ldmatrix(smem, [a_row[t] + (((kc * 2 + (t >> 4)) ^ (a_key[t] & 7)) << 3) for t in range(32)], False)
                        a1 = ldmatrix(smem, [a_row[t] + (((kc * 2 + 2 + (t >> 4)) ^ (a_key[t] & 7)) << 3) for t in range(32)], False)
                        for nt in range(2):
                            if nt == 1 and not second:
                                break
                            addrs = [sk + (jb[nt][t] * HC + hk[nt][t]) * D + (((kc * 2 + (t >> 3)) ^ (jb[nt][t] & 7)) << 3)
                                     for t in range(32)]
                            bk = ldmatrix(smem, addrs, False)
                            d = s_[nt]
                            mma(d, a0, bk[:, 0], bk[:, 1])
                            mma(d, a1, bk[:, 2], bk[:, 3])
                    with np.errstate(invalid="ignore"):
                        for t in range(32):
                            for nt in range(2):
                                for e in range(4):
                                    x = j0 + nt * 8 + (t & 3) * 2 + (e & 1)
                                    ok = x_lo[t, e >> 1] <= x <= x_hi[t, e >> 1]
                                    s_[nt, t, e] = s_[nt, t, e] * scale_log2 if ok else -np.inf
                        alpha = np.zeros((32, 2), np.float32)
                        for r in range(2):
                            mx = np.maximum(np.maximum(s_[0, :, 2 * r], s_[0, :, 2 * r + 1]),
                                            np.maximum(s_[1, :, 2 * r], s_[1, :, 2 * r + 1]))
                            mx = mx.reshape(8, 4).max(axis=1).repeat(4)
                            mx = np.maximum(mx, m[:, r])
                            base = np.where(mx == -np.inf, 0.0, mx).astype(np.float32)
                            alpha[:, r] = np.exp2(m[:, r] - base)
                            m[:, r] = mx
                            tot = np.zeros(32, np.float32)
                            for nt in range(2):
                                for e in range(2):
                                    s_[nt, :, 2 * r + e] = np.exp2(s_[nt, :, 2 * r + e] - base)
                                    tot += s_[nt, :, 2 * r + e]
                            l[:, r] = l[:, r] * alpha[:, r] + tot
                    if j0 > 0:
                        o[:, :, 0:2] *= alpha[None, :, 0:1]
                        o[:, :, 2:4] *= alpha[None, :, 1:2]
                    pa = np.zeros((32, 4, 2), np.float32)
                    pa[:, 0] = bf16_round(s_[0, :, 0:2])
                    pa[:, 1] = bf16_round(s_[0, :, 2:4])
                    pa[:, 2] = bf16_round(s_[1, :, 0:2])
                    pa[:, 3] = bf16_round(s_[1, :, 2:4])
                    for nd in range(DW // 16):
                        addrs = []
                        for t in range(32):
                            xv = j0 + (t & 7) + ((t >> 3) & 1) * 8
                            jv, hv = xv & key_mask, hb + (xv >> key_shift)
                            v_row = sv + (jv * HC + hv) * D if (jv < KJ and hv < HC) else zero_row
                            chunk_v = (dpart * DW) // 8 + nd * 2 + (t >> 4)
                            addrs.append(v_row + ((chunk_v ^ (jv & 7)) << 3))
                        bv = ldmatrix(smem, addrs, True)
                        mma(o[2 * nd], pa, bv[:, 0], bv[:, 1])
                        mma(o[2 * nd + 1], pa, bv[:, 2], bv[:, 3])
                lq = l.reshape(8, 4, 2).sum(axis=1).repeat(4, axis=0)
                for t in range(32):
                    for half in range(2):
                        rr = row0 + (t >> 2) + 8 * half
                        rl, hh = rr & row_mask, hb + (rr >> row_shift)
                        if rl >= LG or hh >= HC:
                            continue
                        i = fast_div(rl, G)
                        hq = (chunk * HC + hh) * G + (rl - i * G)
                        valid = i < blen
                        inv = 1.0 / lq[t, half] if valid and lq[t, half] != 0 else 0.0
                        orow = (block * L + i) * Hq + hq
                        for n in range(DW // 8):
                            at = orow * D + dpart * DW + (t & 3) * 2 + n * 8
                            for e in range(2):
                                out[at + e] = o[n, t, 2 * half + e] * inv if valid else 0.0
                                written[at + e] += 1
                        if dpart == 0 and (t & 3) == 0:
                            lse[orow] = (m[t, half] + np.log2(lq[t, half])) * math.log(2) if valid and lq[t, half] != 0 else -np.inf
                            lwritten[orow] += 1
            stage = 0 if stage + 1 == S else stage + 1
    assert (written == 1).all(), f"out elements written {written.min()}..{written.max()} times"
    assert (lwritten == 1).all(), f"lse elements written {lwritten.min()}..{lwritten.max()} times"
    return torch.from_numpy(out.reshape(N, L, Hq, D)), torch.from_numpy(lse.reshape(N, L, Hq)), pl


CASES = [  # N, L, P, Hq, Hkv, D, ragged
    (9, 4, 2, 12, 12, 64, False),   # the L4 benchmark shape, small N
    (3, 16, 2, 16, 16, 128, True),  # the L16 benchmark shape: DSPLIT 2
    (5, 5, 3, 15, 3, 64, True),     # odd heads, G 5: m-tiles split a token's heads
    (4, 16, 0, 2, 1, 256, True),    # P 0, D 256, one unit -> DSPLIT 2
    (3, 40, 7, 2, 2, 64, True),     # three key tiles, L not a multiple of 16
    (2, 12, 2, 8, 2, 128, True),    # G 4, L G 48: three m-tiles
    (2, 1, 3, 4, 2, 64, True),      # L 1
    (2, 48, 16, 2, 1, 256, False),  # a large item: two stages
    (4, 2, 7, 12, 3, 64, True),     # packing with 16 virtual keys per head (HP 2), L G 8
    (3, 2, 1, 6, 6, 128, True),     # HP 4 (32 virtual keys at most): 6 heads, the second tile half empty
    (3, 3, 2, 6, 3, 64, True),      # L G 6 -> slots of 8 rows, HP 2 with an odd head count
]


def nan_checks() -> int:
    """The NaN guarantees of tests/test_nan.py (main) on the emulated kernel: NaN exactly where
    expected, everything else equal to the reference on the NaN-free inputs."""
    N, L, P, HQ, HKV, D, LENS = 4, 8, 3, 8, 2, 64, [8, 5, 0, 1]
    gen = torch.Generator().manual_seed(1)
    bad = 0

    def inputs():
        q = torch.randn(N, L, HQ, D, generator=gen).bfloat16()
        k = torch.randn(N, P + L, HKV, D, generator=gen).bfloat16()
        v = torch.randn(N, P + L, HKV, D, generator=gen).bfloat16()
        return q, k, v, torch.tensor(LENS, dtype=torch.int32)

    def poison_q(q, k, v, no, nl):
        q[0, 3, 5, 17] = math.nan
        q[3, 0, 2, :] = math.nan
        q[1, 6, 0, 0] = math.nan
        q[2] = math.nan
        nl[0, 3, 5] = nl[3, 0, 2] = True
        no[nl] = True

    def poison_k(q, k, v, no, nl):
        k[0, P + 2, 1, 40] = math.nan
        k[1, 1, 0, 3] = math.nan
        k[3, P + 1, 0, :] = math.nan
        nl[0, 2:, 4:8] = True
        nl[1, :5, 0:4] = True
        no[nl] = True

    def poison_v(q, k, v, no, nl):
        v[0, P + 4, 0, 9] = math.nan
        v[1, 0, 1, 63] = math.nan
        no[0, 4:, 0:4, 9] = True
        no[1, :5, 4:8, 63] = True

    def poison_outside(q, k, v, no, nl):
        for n, blen in enumerate(LENS):
            k[n, P + blen :] = math.nan
            v[n, P + blen :] = math.nan
            q[n, blen:] = math.nan
        k[0, P + L - 1, 0, 5] = math.nan
        v[0, P + L - 1, 1, :] = math.nan
        nl[0, L - 1, 0:4] = True
        no[nl] = True
        no[0, L - 1, 4:8, :] = True

    for name, fn in [("q", poison_q), ("k", poison_k), ("v", poison_v), ("outside", poison_outside)]:
        q, k, v, lens = inputs()
        ref_out, ref_lse = reference.token_decoder_attention(q, k, v, lens)
        nan_out = torch.zeros(N, L, HQ, D, dtype=torch.bool)
        nan_lse = torch.zeros(N, L, HQ, dtype=torch.bool)
        fn(q, k, v, nan_out, nan_lse)
        out, lse, _ = emulate(q, k, v, lens, 1.0 / math.sqrt(D))
        ok = torch.equal(torch.isnan(out), nan_out) and torch.equal(torch.isnan(lse), nan_lse)
        ok = ok and (out[~nan_out].bfloat16().float() - ref_out[~nan_out]).abs().max().item() < 2e-2
        ok = ok and (lse[~nan_lse] - ref_lse[~nan_lse]).nan_to_num(posinf=0, neginf=0).abs().max().item() < 1e-3
        pad = torch.arange(L)[None, :] >= torch.tensor(LENS)[:, None]
        ok = ok and bool((out[pad] == 0).all()) and bool(torch.isneginf(lse[pad]).all())
        bad += not ok
        print(f"NaN in {name}: {'ok' if ok else 'MISMATCH'}")
        CONFLICTS.clear()
    # Packed heads (L 4, G 1: four KV heads per m-tile): NaN V of one head's token, and NaN K/V
    # past block_lens, reach only the rows that attend them.
    q = torch.randn(3, 4, 4, 64, generator=gen).bfloat16()
    k = torch.randn(3, 6, 4, 64, generator=gen).bfloat16()
    v = torch.randn(3, 6, 4, 64, generator=gen).bfloat16()
    lens = torch.tensor([4, 2, 3], dtype=torch.int32)
    ref_out, ref_lse = reference.token_decoder_attention(q, k, v, lens)
    v[0, 2 + 3, 1, 9] = math.nan  # block 0, token 3, KV head 1: element 9 of row 3, head 1
    k[1, 2 + 2 :, 2] = math.nan  # block 1: tokens past block_lens (2), head 2
    v[1, 2 + 2 :] = math.nan
    k[2, 1, 3, 0] = math.nan  # block 2, prefix slot 1, head 3: rows 0..2 of head 3
    nan_out = torch.zeros(3, 4, 4, 64, dtype=torch.bool)
    nan_lse = torch.zeros(3, 4, 4, dtype=torch.bool)
    nan_out[0, 3, 1, 9] = True
    nan_lse[2, :3, 3] = True
    nan_out[nan_lse] = True
    out, lse, pl = emulate(q, k, v, lens, 0.125)
    ok = pl["hp"] == 4 and torch.equal(torch.isnan(out), nan_out) and torch.equal(torch.isnan(lse), nan_lse)
    ok = ok and (out[~nan_out].bfloat16().float() - ref_out[~nan_out]).abs().max().item() < 2e-2
    ok = ok and (lse[~nan_lse] - ref_lse[~nan_lse]).nan_to_num(posinf=0, neginf=0).abs().max().item() < 1e-3
    bad += not ok
    print(f"NaN with packed heads: {'ok' if ok else 'MISMATCH'}")
    CONFLICTS.clear()
    return bad


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for n, L, P, hq, hkv, d, ragged in CASES:
        q = torch.randn(n, L, hq, d, generator=gen).bfloat16()
        k = torch.randn(n, P + L, hkv, d, generator=gen).bfloat16()
        v = torch.randn(n, P + L, hkv, d, generator=gen).bfloat16()
        lens = None
        if ragged:
            lens = torch.randint(0, L + 1, (n,), generator=gen, dtype=torch.int32)
            lens[0] = L
            if n > 1:
                lens[1] = max(L - 1, 0)
        scale = 1.0 / math.sqrt(d)
        out, lse, pl = emulate(q, k, v, lens, scale)
        ref_out, ref_lse = reference.token_decoder_attention(q, k, v, lens, scale=scale)
        err = (out.bfloat16().float() - ref_out).abs().max().item()
        lerr = (lse - ref_lse).nan_to_num(posinf=0, neginf=0).abs().max().item()
        same_inf = bool((torch.isneginf(lse) == torch.isneginf(ref_lse)).all())
        ok = err < 2e-2 and lerr < 1e-3 and same_inf
        bad += not ok
        print(f"  ldmatrix phases by conflict ways: {dict(sorted(CONFLICTS.items()))}")
        CONFLICTS.clear()
        print(f"N{n} L{L} P{P} Hq{hq} Hkv{hkv} D{d} ragged={ragged}: hc={pl['hc']} m_tiles={pl['m_tiles']} "
              f"hp={pl['hp']} dsplit={pl['dsplit']} stages={pl['stages']} grid={pl['grid']}x{pl['per_cta']} "
              f"max|out err|={err:.2e} max|lse err|={lerr:.2e} {'ok' if ok else 'MISMATCH'}")
    bad += nan_checks()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
