"""Index checks of the "lean" variant of csrc/include/kvcore/token_decoder_attention.cuh
(token_decoder_attention_lean_kernel, KVCORE_TOKEN_DECODER_VARIANT=lean), without a GPU.

The lean kernel's arithmetic (fragments, masking, softmax) is the default kernel's, which
token_decoder_emulate.py emulates numerically; what is new is index math, checked here per shape
(the emulator's cases plus both benchmark shapes):
  * the copy table: per thread, entry v = tid + k THREADS holds exactly the (source offset,
    swizzled destination) pairs the default kernel's prefetch computes for that thread, in range
    (uint32, inside the stage region);
  * the shared-memory layout (ring | 2 staging tiles | zero row | table | stage lengths) fits the
    launcher's byte count, regions disjoint, 16-byte aligned where vectors are read;
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


def lean_smem_bytes(stage_elems, stages, D, q_elems, table_entries):
    return 2 * (stage_elems * stages + 2 * q_elems + D) + 8 * table_entries + 16


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
    # The launcher's stage choice for the lean kernel, and the layout it implies.
    stages = 3 if lean_smem_bytes(stage_elems, 3, D, q_elems, nq + nkv) <= 112 * 1024 else 2
    smem = lean_smem_bytes(stage_elems, stages, D, q_elems, nq + nkv)
    staging = stages * stage_elems  # element offsets
    zero_row = staging + 2 * q_elems
    table_byte = 2 * (zero_row + D)
    stage_len_byte = table_byte + 8 * (nq + nkv)
    assert table_byte % 16 == 0 and (2 * staging) % 16 == 0 and (2 * q_elems) % 16 == 0
    assert stage_len_byte + 16 == smem

    # ---- the table against the default prefetch, per thread ----
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
    return dict(pl=pl, stages=stages, smem=smem, conflicts=conflicts)


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
        print(f"L{L} P{P} Hq{hq} Hkv{hkv} D{d}: hc={pl['hc']} hp={pl['hp']} dsplit={pl['dsplit']} lean stages="
              f"{r['stages']} smem={r['smem'] / 1024:.1f} KB; store/copy phases by conflict ways "
              f"{dict(sorted(r['conflicts'].items()))} {'ok' if worst == 1 else 'CONFLICTS'}"
              f"{' (over 227 KB: the launcher runs the default kernel)' if r['smem'] > 227 * 1024 else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
