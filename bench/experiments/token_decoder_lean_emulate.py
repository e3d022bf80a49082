"""Index checks of the "lean" variant of csrc/include/kvcore/token_decoder_attention.cuh
(token_decoder_attention_lean_kernel, KVCORE_TOKEN_DECODER_VARIANT=lean), without a GPU.

The lean kernel's arithmetic (fragments, masking, softmax) is the default kernel's, which
token_decoder_emulate.py emulates numerically; what is new is index math, checked here per shape
(the emulator's cases plus both benchmark shapes):
  * the copy table: per thread, entry v = tid + k THREADS holds exactly the (source offset,
    swizzled destination) pairs the default kernel's prefetch computes for that thread, in range
    (uint32, inside the stage region);
  * the compact table (TdCopyEntry<true>: one uint32, destination vector in the low 14 bits,
    source vector in the high 18): where token_decoder_lean_compact_fits says it fits, every
    entry encodes and decodes back to the wide entry exactly; the predicate's bounds are the
    table's exact maxima (so it is neither loose nor over-strict), over the shapes below and a
    sweep of shapes on both sides of the 2^18-vector source limit (compact_sweep);
  * the shared-memory layout (ring | 2 staging tiles | zero row | table | stage lengths), with 2
    and 3 stages and the table the launcher picks (4- or 8-byte entries), fits the launcher's
    byte count, regions disjoint, aligned where vectors and entries are read; CTAs per SM by
    shared memory (H100/H200: 233,472 B per SM, 1,024 B reserved per CTA) with each table, and
    the launcher's pick when registers (REGS, from ptxas -v) count too (L16 D128: lean compact,
    2 stages, 3 CTAs per SM; L4 D64: classic, 2 stages, 4);
  * the epilogue's 4-byte staging stores (fast path) and the exact path's element stores: every
    element of the staging tile written exactly once per item, each with the out element it
    belongs to; every 4-byte store instruction free of bank conflicts;
  * the copy-out: each thread's q entries read 16 bytes of the staging tile and write them to the
    out element the epilogue meant (block-relative offset chunk HCG D + source offset), every out
    element of the item exactly once, each 8-lane phase of the 16-byte shared loads conflict-free.

    python bench/experiments/token_decoder_lean_emulate.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_decoder_emulate import CASES, WARPS, fast_div, plan  # noqa: E402

THREADS = WARPS * 32


SM_SMEM, CTA_RESERVED, OPTIN = 233_472, 1_024, 232_448  # H100 / H200 shared memory per SM and CTA
DST_BITS = 14  # kTdCompactDstBits
SRC_BITS = 32 - DST_BITS


def lean_smem_bytes(stage_elems, stages, D, q_elems, table_entries, compact):
    return 2 * (stage_elems * stages + 2 * q_elems + D) + (4 if compact else 8) * table_entries + 16


def ctas_by_smem(smem):
    return SM_SMEM // (smem + CTA_RESERVED) if smem <= OPTIN else 0


# Registers per thread (ptxas -v, nvcc 13.0, sm_90a, bf16; the same for fp16 within 1) of each
# kernel by (kernel, D, DSPLIT): the launcher's occupancy query also sees them.
REGS = {
    ("classic", 64, 1): 111, ("classic", 64, 2): 96, ("classic", 128, 1): 162, ("classic", 128, 2): 133,
    ("classic", 256, 1): 249, ("classic", 256, 2): 177,
    ("wide", 64, 1): 122, ("wide", 64, 2): 96, ("wide", 128, 1): 176, ("wide", 128, 2): 147,
    ("wide", 256, 1): 246, ("wide", 256, 2): 168,
    ("compact", 64, 1): 122, ("compact", 64, 2): 110, ("compact", 128, 1): 174, ("compact", 128, 2): 147,
    ("compact", 256, 1): 245, ("compact", 256, 2): 167,
}


def ctas_per_sm(smem, regs, threads=THREADS):
    """cudaOccupancyMaxActiveBlocksPerMultiprocessor on an H100/H200 for a CTA of `threads`."""
    warps = threads // 32
    per_warp = -(-(-(-regs // 8) * 8 * 32) // 256) * 256  # registers rounded to 8, a warp's to 256
    by_regs = (65536 // per_warp) // warps
    return min(ctas_by_smem(smem), by_regs, 64 // warps, 32)


def launcher_choice(pl, D, q_elems, entries, compact_ok):
    """The launcher's pick: the most CTAs per SM; lean compact, lean wide, classic, and 3 stages
    before 2, on ties."""
    best = (None, 0, 0)
    for kind in ("compact", "wide", "classic"):
        if kind == "compact" and not compact_ok:
            continue
        for stages in (3, 2):
            if kind == "classic":
                smem = 2 * (pl["stage_elems"] * stages + D) + 16
            else:
                smem = lean_smem_bytes(pl["stage_elems"], stages, D, q_elems, entries, kind == "compact")
            n = ctas_per_sm(smem, REGS[(kind, D, pl["dsplit"])])
            if n > best[2]:
                best = (kind, stages, n)
    return best


def compact_fits(L, KJ, Hq, Hkv, HCG, HC, D):
    """token_decoder_lean_compact_fits."""
    td = D // 8
    src_vectors = max(((L - 1) * Hq + HCG) * td, ((KJ - 1) * Hkv + HC) * td)
    dst_vectors = max(L * HCG, KJ * HC) * td
    return L > 0 and src_vectors <= 1 << SRC_BITS and dst_vectors <= 1 << DST_BITS


def encode(src, dst):
    """TdCopyEntry<true>::make."""
    assert src % 8 == 0 and dst % 8 == 0
    e = ((src >> 3) << DST_BITS) | (dst >> 3)
    assert 0 <= e < 1 << 32
    return e


def decode(e):
    """TdCopyEntry<true>::src / dst, in elements (the kernel steps uint4 pointers)."""
    return (e >> DST_BITS) * 8, (e & ((1 << DST_BITS) - 1)) * 8


def build_table(L, Hq, Hkv, D, G, KJ, HC, HP, row_shift):
    """The kernel's table loops: nq q/out entries, then nkv k/v entries, (source, destination)
    in elements."""
    HCG, TD = HC * G, D // 8
    nq, nkv = L * HCG * TD, KJ * HC * TD
    table = [None] * (nq + nkv)
    for v in range(nq):
        r, c = v // TD, v % TD
        i = fast_div(r, HCG)
        h = r - i * HCG
        hh = fast_div(h, G)
        key = ((hh & (HP - 1)) << row_shift) + i * G + (h - hh * G)
        table[v] = ((i * Hq + h) * D + c * 8, r * D + ((c ^ (key & 7)) << 3))
    for v in range(nkv):
        r, c = v // TD, v % TD
        j = fast_div(r, HC)
        table[nq + v] = ((j * Hkv + (r - j * HC)) * D + c * 8, r * D + ((c ^ (j & 7)) << 3))
    return table


def check_compact(table, L, KJ, Hq, Hkv, HCG, HC, D) -> bool:
    """The predicate against the table's real maxima; round trip of every entry where it fits."""
    fits = compact_fits(L, KJ, Hq, Hkv, HCG, HC, D)
    max_src = max(src for src, _ in table) // 8
    max_dst = max(dst for _, dst in table) // 8
    td = D // 8
    # The bounds are the exact maxima (+ 1): the predicate is neither loose nor over-strict.
    assert max_src + 1 == max(((L - 1) * Hq + HCG) * td, ((KJ - 1) * Hkv + HC) * td), "source bound not exact"
    assert max_dst + 1 == max(L * HCG, KJ * HC) * td, "destination bound not exact"
    assert fits == (max_src < 1 << SRC_BITS and max_dst < 1 << DST_BITS)
    if fits:
        for src, dst in table:
            assert decode(encode(src, dst)) == (src, dst), "compact entry does not round-trip"
    return fits


def check(L, P, Hq, Hkv, D, blens) -> dict:
    pl = plan(4, L, P, Hq, Hkv, D)
    G, KJ, HC, MT, DSPLIT = pl["G"], pl["keys"], pl["hc"], pl["m_tiles"], pl["dsplit"]
    HCG, LG, TD, DW = HC * G, L * G, D // 8, D // pl["dsplit"]
    HP, row_shift, key_shift = pl["hp"], pl["row_shift"], pl["key_shift"]
    row_mask = (1 << row_shift) - 1
    stage_elems = pl["stage_elems"]
    q_elems = L * HCG * D
    nq, nkv = L * HCG * TD, KJ * HC * TD
    k_off = L * HCG * D
    # ---- the table against the default prefetch, per thread ----
    table = build_table(L, Hq, Hkv, D, G, KJ, HC, HP, row_shift)
    compact = check_compact(table, L, KJ, Hq, Hkv, HCG, HC, D)
    if compact:  # the rest of the checks read the entries as the kernel decodes them
        table = [decode(encode(src, dst)) for src, dst in table]

    # The layout with either depth (the launcher picks by CTAs per SM, which here also depends
    # on registers), with the table the launcher picks.
    smem = {}
    for stages in (2, 3):
        smem[stages] = lean_smem_bytes(stage_elems, stages, D, q_elems, nq + nkv, compact)
        staging = stages * stage_elems  # element offsets
        zero_row = staging + 2 * q_elems
        table_byte = 2 * (zero_row + D)
        stage_len_byte = table_byte + (4 if compact else 8) * (nq + nkv)
        assert table_byte % 16 == 0 and (2 * staging) % 16 == 0 and (2 * q_elems) % 16 == 0
        assert stage_len_byte % 4 == 0 and stage_len_byte + 16 == smem[stages]
    wide2 = lean_smem_bytes(stage_elems, 2, D, q_elems, nq + nkv, False)
    choice = launcher_choice(pl, D, q_elems, nq + nkv, compact)
    for tid in range(THREADS):
        col = tid & (TD - 1)
        mine_q = [table[v] for v in range(tid, nq, THREADS)]
        want_q = []
        for r in range(tid // TD, L * HCG, THREADS // TD):  # the default kernel's q loop
            i = fast_div(r, HCG)
            h = r - i * HCG
            hh = fast_div(h, G)
            key = ((hh & (HP - 1)) << row_shift) + i * G + (h - hh * G)
            want_q.append((col * 8 + (i * Hq + h) * D, r * D + ((col ^ (key & 7)) << 3)))
        assert mine_q == want_q, f"tid {tid}: q table differs from the default prefetch"
        mine_kv = [table[nq + v] for v in range(tid, nkv, THREADS)]
        want_kv = []
        for r in range(tid // TD, KJ * HC, THREADS // TD):
            j = fast_div(r, HC)
            want_kv.append((col * 8 + (j * Hkv + (r - j * HC)) * D, r * D + ((col ^ (j & 7)) << 3)))
        assert mine_kv == want_kv, f"tid {tid}: k/v table differs from the default prefetch"
    for src, dst in table[:nq]:
        assert 0 <= src < 2**31 and 0 <= dst and dst + 8 <= k_off
    for src, dst in table[nq:]:
        assert 0 <= src < 2**31 and 0 <= dst and dst + 8 <= KJ * HC * D

    conflicts: dict[str, int] = {}

    def note(kind, ways):
        key = f"{kind}:{ways}"
        conflicts[key] = conflicts.get(key, 0) + 1

    for chunk in range(pl["chunks"]):
        for blen in blens:
            for path in ("fast", "exact"):
                staged = [-1] * q_elems  # staging element -> block-relative out offset
                for u in range(pl["head_groups"] * MT * DSPLIT):
                    dpart = u % DSPLIT
                    hm = u // DSPLIT
                    hg, mt = hm // MT, hm % MT
                    hb, row0 = hg * HP, mt * 16
                    if path == "fast":
                        for half in range(2):
                            for n in range(DW // 8):
                                words = {}
                                for t in range(32):
                                    rr = row0 + (t >> 2) + 8 * half
                                    rl, hh = rr & row_mask, hb + (rr >> row_shift)
                                    if rl >= LG or hh >= HC:
                                        continue
                                    i = fast_div(rl, G)
                                    hl = hh * G + (rl - i * G)
                                    cpair = (t & 3) * 2
                                    at = (i * HCG + hl) * D + cpair + ((((dpart * DW) // 8 + n) ^ (rr & 7)) << 3)
                                    words.setdefault((at * 2 // 4) % 32, set()).add(at * 2 // 4)
                                    for e in range(2):
                                        assert staged[at + e] == -1, "staging element written twice"
                                        staged[at + e] = (i * Hq + chunk * HCG + hl) * D + dpart * DW + n * 8 + cpair + e
                                if words:
                                    note("sts32", max(len(x) for x in words.values()))
                    else:
                        QPL, OPL = D // 32, DW // 32
                        assert QPL >= 1 and OPL >= 1 and 8 % OPL == 0
                        for t in range(16):
                            rr = row0 + t
                            rl, hh = rr & row_mask, hb + (rr >> row_shift)
                            if rl >= LG or hh >= HC:
                                continue
                            i = fast_div(rl, G)
                            hl = hh * G + (rl - i * G)
                            for lane in range(32):
                                od0 = dpart * DW + lane * OPL
                                at = (i * HCG + hl) * D + ((((od0 >> 3) ^ (rr & 7)) << 3) | (od0 & 7))
                                for e in range(OPL):
                                    assert staged[at + e] == -1, "staging element written twice (exact)"
                                    staged[at + e] = (i * Hq + chunk * HCG + hl) * D + od0 + e
                assert all(x >= 0 for x in staged), f"{path}: staging elements never written"
                # ---- copy-out ----
                covered = set()
                for warp in range(WARPS):
                    for k0 in range(0, nq, THREADS):
                        lanes = [(t, k0 + warp * 32 + t) for t in range(32) if k0 + warp * 32 + t < nq]
                        for ph in range(0, 32, 8):
                            groups = {}
                            for t, v in lanes[ph : ph + 8]:
                                groups.setdefault((table[v][1] * 2 // 16) % 8, set()).add(table[v][1])
                            if groups:
                                note("lds128", max(len(x) for x in groups.values()))
                        for t, v in lanes:
                            src, dst = table[v]
                            for x in range(8):
                                o = chunk * HCG * D + src + x
                                assert staged[dst + x] == o, f"{path}: copy-out writes the wrong out element"
                                assert o not in covered and 0 <= o < L * Hq * D
                                covered.add(o)
                item_elems = {(i * Hq + chunk * HCG + h) * D + d for i in range(L) for h in range(HCG) for d in range(D)}
                assert covered == item_elems, f"{path}: copy-out misses out elements of the item"
    return dict(pl=pl, compact=compact, smem=smem, wide2=wide2, choice=choice, conflicts=conflicts)


def compact_sweep() -> int:
    """check_compact over shapes on both sides of the limits (tables only; the plan's chunk)."""
    n = {True: 0, False: 0}
    for D in (64, 128, 256):
        for L in (1, 4, 16, 63, 64):
            for P in (0, 2, 16):
                for Hkv, G in ((1, 1), (8, 1), (16, 1), (4, 8), (64, 2), (256, 1), (260, 1), (261, 1), (128, 8)):
                    Hq = Hkv * G
                    pl = plan(4, L, P, Hq, Hkv, D)
                    table = build_table(L, Hq, Hkv, D, G, pl["keys"], pl["hc"], pl["hp"], pl["row_shift"])
                    n[check_compact(table, L, pl["keys"], Hq, Hkv, pl["hc"] * G, pl["hc"], D)] += 1
    print(f"compact_sweep: {n[True] + n[False]} shapes, predicate exact, {n[True]} compact (every entry round-trips), "
          f"{n[False]} wide")
    assert n[True] and n[False]
    return 0


def main() -> int:
    shapes = [(L, P, hq, hkv, d) for _, L, P, hq, hkv, d, _ in CASES] + [(16, 2, 16, 16, 128), (4, 2, 12, 12, 64)]
    bad = 0
    for L, P, hq, hkv, d in shapes:
        blens = sorted({0, 1, max(L - 1, 0), L})
        try:
            r = check(L, P, hq, hkv, d, blens)
        except AssertionError as e:
            print(f"L{L} P{P} Hq{hq} Hkv{hkv} D{d}: FAIL {e}")
            bad += 1
            continue
        pl = r["pl"]
        worst = max(int(k.split(":")[1]) for k in r["conflicts"])
        bad += worst != 1
        sm = r["smem"]
        print(f"L{L} P{P} Hq{hq} Hkv{hkv} D{d}: hc={pl['hc']} hp={pl['hp']} dsplit={pl['dsplit']} table "
              f"{'compact' if r['compact'] else 'wide'}: 2 stages {sm[2]} B ({ctas_by_smem(sm[2])} CTAs/SM by smem; "
              f"wide {r['wide2']} B, {ctas_by_smem(r['wide2'])}), 3 stages {sm[3]} B ({ctas_by_smem(sm[3])}); "
              f"launcher (smem + registers): {r['choice'][0]} {r['choice'][1]} stages, {r['choice'][2]} CTAs/SM; "
              f"store/copy phases by conflict ways {dict(sorted(r['conflicts'].items()))} "
              f"{'ok' if worst == 1 else 'CONFLICTS'}"
              f"{' (over 227 KB: the launcher runs the default kernel)' if sm[2] > OPTIN else ''}")
    try:
        compact_sweep()
    except AssertionError as e:
        print(f"compact_sweep: FAIL {e}")
        bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
