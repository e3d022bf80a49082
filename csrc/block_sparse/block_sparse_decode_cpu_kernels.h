// The kernels of block_sparse_decode_cpu.cpp (see there), compiled once per instruction set through
// common/cpu_isa_kernels.h: no include guard and no #include here (cpu_isa.h says why).
namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {

static_assert(kChunk <= 32, "cpu::attend_chunk_bf16 takes at most 32 keys a chunk");

template <typename scalar_t>
void block_sparse_decode_tasks(const BlockSparseParams& p, const scalar_t* q, const scalar_t* k_cache,
                               const scalar_t* v_cache, const int32_t* block_table, const int32_t* seq_lens,
                               const int32_t* sel_pages, const int32_t* sel_counts, bool bf16_dot, scalar_t* out,
                               float* lse) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t G = p.group, D = p.head_dim, H = p.num_kv_heads, Hq = H * G, PS = p.page_size;
  const int64_t row = H * D;  // elements per token slot in a page (dense)
  const int64_t capacity = p.num_pages > 0 ? p.max_pages * PS : 0;

  // Clamped lengths, the pages each sequence uses, and the virtual key range of each (b, h).
  std::vector<int64_t> len(p.batch), used_pages(p.batch), slots(p.batch * H);
  int64_t longest = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    len[b] = std::clamp<int64_t>(seq_lens[b], 0, capacity);
    used_pages[b] = (len[b] + PS - 1) / PS;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t count = len[b] > 0 ? std::clamp<int64_t>(sel_counts[b * H + h], 0, p.max_sel) : 0;
      slots[b * H + h] = count * PS;
      longest = std::max(longest, slots[b * H + h]);
    }
  }
  const int64_t pairs = p.batch * H;
  const int64_t threads = at::get_num_threads();
  int64_t parts;
  if (p.num_splits > 0) {
    parts = forced_cpu_parts(p.num_splits, longest, kChunk);
  } else {
    parts = std::clamp<int64_t>((2 * threads + pairs - 1) / pairs, 1, std::max<int64_t>(1, longest / kMinPartTokens));
  }
  const cpu::TaskParts task_parts(pairs * parts, G, D);
  float* const part_out = task_parts.out.get();
  float* const part_lse = task_parts.lse.get();

  at::parallel_for(0, pairs * parts, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch, reused across the tasks of this range.
    // (No conversion rows for an fp32 cache: attend_chunk reads it in place.)
    constexpr bool fp32 = std::is_same_v<scalar_t, float>;
    std::vector<float> qf(G * D), acc(G * D), krow(fp32 ? 0 : cpu::kLogitRows * D), vrows(fp32 ? 0 : kChunk * D), logits(G * kChunk),
        m(G), l(G);
    // bf16 with AVX512_BF16 (cpu::attend_chunk_bf16): q's bits and the value pairs.
    const bool pairwise = bf16_dot && cpu::has_bf16_dot<scalar_t>();
    std::vector<uint16_t> qbf(pairwise ? G * D : 0);
    std::vector<uint32_t> vpairs(pairwise ? (kChunk + 1) / 2 * D : 0);
    const cpu::ChunkScratch scratch{krow.data(), vrows.data(), logits.data(), kChunk, pairwise ? qbf.data() : nullptr,
                                    pairwise ? vpairs.data() : nullptr};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / parts, part = task % parts;
      const int64_t b = pair / H, h = pair % H;
      const int64_t span = (slots[pair] + parts - 1) / parts;
      const int64_t start = std::min(slots[pair], part * span), stop = std::min(slots[pair], start + span);
      const int32_t* pages = block_table + b * p.max_pages;
      const int32_t* chosen = sel_pages + pair * p.max_sel;

      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* qh = q + b * p.q_stride_b + (h * G + g) * p.q_stride_h;
        cpu::to_float(qh, qf.data() + g * D, D);
        if (pairwise) __builtin_memcpy(qbf.data() + g * D, qh, D * sizeof(uint16_t));
        m[g] = kNegInf;
        l[g] = 0.0f;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);

      int64_t slot = start;
      while (slot < stop) {
        // Gather up to kChunk real keys: skip listed pages outside the sequence and the slots
        // past seq_len in its last page.
        int64_t k_off[kChunk], v_off[kChunk];
        int64_t n = 0;
        while (n < kChunk && slot < stop) {
          const int64_t logical = chosen[slot / PS];
          const int64_t offset = slot % PS;
          if (logical < 0 || logical >= used_pages[b]) {
            slot += PS - offset;  // the whole listed page is outside the sequence
            continue;
          }
          const int64_t pos = logical * PS + offset;
          if (pos >= len[b]) {
            slot += PS - offset;  // the rest of the (last) page is unfilled
            continue;
          }
          const int64_t page = std::clamp<int64_t>(pages[logical], 0, p.num_pages - 1);
          k_off[n] = page * p.k_page_stride + offset * row + h * D;
          v_off[n] = page * p.v_page_stride + offset * row + h * D;
          ++n;
          ++slot;
        }
        if (n == 0) continue;  // only possible when slot reached stop

        cpu::attend_chunk(n, k_cache, k_off, v_cache, v_off, D, G, G, D, qf.data(), p.scale, p.soft_cap, scratch,
                          m.data(), l.data(), acc.data());
      }

      // This part's normalised output and log-sum-exp (zeros and -inf when it saw no key). A NaN
      // l (a NaN logit) is not empty: it gives NaN out and NaN lse, which the merge passes on.
      float* po = part_out + task * G * D;
      float* pl = part_lse + task * G;
      for (int64_t g = 0; g < G; ++g) cpu::finish_part(acc.data() + g * D, m[g], l[g], D, po + g * D, pl + g);
    }
  });

  // Merge the parts of each (sequence, query head) in part order.
  at::parallel_for(0, p.batch * Hq, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(D);
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / Hq, hq = bq % Hq, h = hq / G, g = hq % G;
      const int64_t first = (b * H + h) * parts;  // task index of part 0
      cpu::merge_parts(
          parts, [&](int64_t j) { return part_lse[(first + j) * G + g]; },
          [&](int64_t j) { return part_out + ((first + j) * G + g) * D; }, D, out + bq * D,
          lse != nullptr ? lse + bq : nullptr, scratch.data());
    }
  });
}

}  // namespace KVCORE_CPU_ISA_NS
}  // namespace
}  // namespace kvcore
