// CUDA launcher of compact_kv: checks, the scratch of tickets and flags, and the launch. The
// kernel (framework-free) is csrc/include/kvcore/compact_kv.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "common/checks.h"
#include "common/cuda_occupancy.h"
#include "common/env_switch.h"
#include "kvcore/compact_kv.cuh"

namespace kvcore {
namespace {

// Widest vector (16, 8, 4 or 2 bytes) that every row start of both caches is aligned to.
int vector_bytes(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const int64_t es = k_cache.element_size();
  const uint64_t bits = reinterpret_cast<uintptr_t>(k_cache.data_ptr()) | reinterpret_cast<uintptr_t>(v_cache.data_ptr()) |
                        uint64_t(k_cache.stride(0) * es) | uint64_t(v_cache.stride(0) * es) |
                        uint64_t(k_cache.size(3) * es);
  for (int w : {16, 8, 4}) {
    if (bits % w == 0) return w;
  }
  return 2;
}

// The kernel's scratch (two counters and the per-chunk flags; see CompactKvParams::scratch) and
// the value this launch marks its flags with. Eager calls use one persistent buffer per (device,
// stream), zeroed when it is made; each launch leaves its counters zero and takes the next mark,
// so a call costs no memset. Launches on one stream run one at a time, so they never share the
// counters; the marks are unique per buffer, whatever order host threads enqueue them in. When
// the marks run out (2^32 - 1 launches) or a call needs more flags than the buffer holds, a new
// zeroed buffer replaces it: zero-filled on `stream`, before the launch, and the old one goes back
// to the caching allocator, which hands it out again only in this stream's order (`hold` keeps it
// alive until this call's launch is enqueued).
// Calls under graph capture get their own buffer, zeroed by a memset node, and mark 1: a graph's
// replays must not share memory with eager calls or other graphs that may run at the same time.
unsigned* scratch_for(const at::Tensor& like, cudaStream_t stream, int64_t words, at::Tensor& hold, unsigned& mark) {
  const auto options = like.options().dtype(at::kInt);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  // KVCORE_COMPACT_SCRATCH=memset: every call takes the graph path (an A/B switch for the bench).
  static const bool persistent =
      env_choice("KVCORE_COMPACT_SCRATCH", {"persistent", "memset"}, "compact_kv (CUDA)") == 0;
  if (capture != cudaStreamCaptureStatusNone || !persistent) {
    hold = at::empty({words}, options);
    C10_CUDA_CHECK(cudaMemsetAsync(hold.data_ptr(), 0, size_t(words) * sizeof(int), stream));
    mark = 1u;
    return reinterpret_cast<unsigned*>(hold.data_ptr());
  }
  struct Buffer {
    at::Tensor words;
    unsigned last_mark = 0;
  };
  static std::mutex mu;
  // Never destroyed: no CUDA frees at process exit.
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, Buffer>();
  std::lock_guard<std::mutex> lock(mu);
  Buffer& buf = (*buffers)[{int(like.get_device()), stream}];
  if (!buf.words.defined() || buf.words.numel() < words || buf.last_mark == ~0u) {
    const int64_t have = buf.words.defined() ? buf.words.numel() : 0;
    buf.words = at::zeros({have >= words ? have : std::max(words, 2 * have)}, options);
    buf.last_mark = 0;
  }
  mark = ++buf.last_mark;
  hold = buf.words;
  return reinterpret_cast<unsigned*>(buf.words.data_ptr());
}

// KVCORE_COMPACT_KERNEL: `auto` (the default since session 12): the pipelined kernel (resident
// CTAs that stage the next chunk's header while the current chunk's payload is in flight) for
// calls with more chunks than resident CTAs, the chunk kernel (one CTA per chunk, the only form
// before) otherwise; `pipelined` / `chunk`: always that kernel. The chunk kernel also takes pages
// whose bytes do not fit the pipelined kernel's int32 offsets. Read once per process.
enum class CompactKernel { kAuto = 0, kPipelined = 1, kChunk = 2 };
CompactKernel compact_kernel_choice() {
  static const CompactKernel choice =
      CompactKernel(env_choice("KVCORE_COMPACT_KERNEL", {"auto", "pipelined", "chunk"}, "compact_kv (CUDA)"));
  return choice;
}

// may_pipeline: the switch allows the pipelined kernel and a page's bytes fit its int32 offsets.
template <typename Vec>
void launch(CompactKvParams& p, bool may_pipeline, cudaStream_t stream) {
  p.units = int(p.head_bytes / int64_t(sizeof(Vec)));
  // Occupancy (6 CTAs per SM) is bound by shared memory; it reads nothing twice through L1.
  auto kernel = &compact_kv_pipelined_kernel<Vec>;
  int64_t slots = 0;
  if (may_pipeline) {
    prefer_max_shared_carveout(reinterpret_cast<const void*>(kernel));
    const int per_sm = ctas_per_sm(reinterpret_cast<const void*>(kernel), compact_detail::kThreads, 0, "compact_kv");
    slots = int64_t(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  }
  // With no more chunks than resident CTAs there is nothing to pipeline, and the pipelined
  // kernel's extra round trips (a ticket taken ahead, the count at the end) only add: session 12
  // timed keep 2048 of S131072 (256 chunks) at 21 us pipelined, 13 us with the chunk kernel.
  if (may_pipeline && (p.tickets > slots || compact_kernel_choice() == CompactKernel::kPipelined)) {
    // At least one CTA, so the lengths are written even when nothing moves.
    const int64_t grid = std::max<int64_t>(1, std::min(p.tickets, slots));
    kernel<<<dim3(unsigned(grid)), compact_detail::kThreads, 0, stream>>>(p);
  } else {
    prefer_max_shared_carveout(reinterpret_cast<const void*>(&compact_kv_kernel<Vec>));
    const int64_t grid = std::max<int64_t>(1, p.tickets);
    compact_kv_kernel<Vec><<<dim3(unsigned(grid)), compact_detail::kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void compact_kv_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& block_table, at::Tensor& seq_lens,
                     const at::Tensor& kept, const at::Tensor& kept_lens) {
  const CompactShape s = check_compact_kv(k_cache, v_cache, block_table, seq_lens, kept, kept_lens);
  if (s.batch == 0) return;
  TORCH_CHECK(s.batch < (int64_t(1) << 31) && s.num_kv_heads < (int64_t(1) << 31), "compact_kv (CUDA): block_table rows (",
              s.batch, ") and k_cache num_kv_heads (", s.num_kv_heads, ") must be < 2^31");
  TORCH_CHECK(s.num_pages < (int64_t(1) << 31), "compact_kv (CUDA): k_cache has too many pages (", s.num_pages, ")");
  TORCH_CHECK(s.page_size < (int64_t(1) << 31) && s.max_pages < (int64_t(1) << 31),
              "compact_kv (CUDA): block_table/k_cache sizes out of range");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  CompactKvParams p{};
  const int64_t es = k_cache.element_size();
  p.k_cache = static_cast<char*>(k_cache.data_ptr());
  p.v_cache = static_cast<char*>(v_cache.data_ptr());
  p.k_page_stride = k_cache.stride(0) * es;
  p.v_page_stride = v_cache.stride(0) * es;
  p.row_stride = s.num_kv_heads * s.head_dim * es;
  p.head_bytes = s.head_dim * es;
  p.block_table = block_table.data_ptr<int>();
  p.seq_lens = seq_lens.data_ptr<int>();
  p.kept = kept.data_ptr<int64_t>();
  p.kept_lens = kept_lens.data_ptr<int>();
  p.batch = int(s.batch);
  p.num_kv_heads = int(s.num_kv_heads);
  p.page_size = int(s.page_size);
  p.num_pages = int(s.num_pages);
  p.max_pages = int(s.max_pages);
  p.max_kept = s.max_kept;
  // No page at all: nothing can be kept (the same clamped rule as the CPU kernel).
  p.capacity = s.num_pages == 0 ? 0 : s.max_pages * s.page_size;

  const int vb = vector_bytes(k_cache, v_cache);
  // Rows per chunk: what the shared-memory chunk holds of one tensor, at most kRows (the rows
  // are staged one per thread of warps 0-1).
  const int64_t chunk_bytes = compact_detail::kChunkBytes;
  TORCH_CHECK(p.head_bytes <= chunk_bytes, "compact_kv (CUDA): k_cache head_dim x element size (", p.head_bytes,
              " bytes) must be at most ", chunk_bytes, " bytes");
  const bool nothing = p.capacity == 0 || s.num_kv_heads == 0 || p.head_bytes == 0 || s.max_kept == 0;
  p.chunk_rows = nothing ? 1 : int(std::min<int64_t>(compact_detail::kRows, chunk_bytes / p.head_bytes));
  // Rows past the capacity are never kept, so chunks are counted over min(max_kept, capacity).
  const int64_t rows = nothing ? 0 : std::min(s.max_kept, p.capacity);
  p.chunks = (rows + p.chunk_rows - 1) / p.chunk_rows;
  p.tickets = s.batch * s.num_kv_heads * p.chunks;
  TORCH_CHECK(p.tickets < (int64_t(1) << 31) - 1, "compact_kv (CUDA): too many chunks (", p.tickets,
              ": batch x num_kv_heads x ceil(max_kept / ", p.chunk_rows, ")); must be < 2^31 - 1");
  at::Tensor hold;  // this call's scratch stays allocated until the launch is enqueued
  p.scratch = scratch_for(k_cache, stream, 2 + p.tickets, hold, p.flag_mark);
  // The pipelined kernel keeps a row's offset inside its page in int32.
  const bool may_pipeline =
      compact_kernel_choice() != CompactKernel::kChunk && s.page_size * p.row_stride < (int64_t(1) << 31);
  switch (vb) {
    case 16: return launch<uint4>(p, may_pipeline, stream);
    case 8: return launch<uint2>(p, may_pipeline, stream);
    case 4: return launch<unsigned>(p, may_pipeline, stream);
    default: return launch<unsigned short>(p, may_pipeline, stream);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcore, CUDA, m) { m.impl("compact_kv", &compact_kv_cuda); }

}  // namespace kvcore
