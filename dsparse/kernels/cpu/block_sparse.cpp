// Block-sparse GEMM kernels for x86-64 CPUs with AVX2 and FMA (fp32), built at first use by
// dsparse/kernels/cpu/__init__.py. Two operators, registered as dsparse_cpu::*:
//
//   block_spmm(a, values, ptr, slots, idx, transpose_w, column_major_out) -> out [M, J * B]
//       out[:, j] = sum over the entries e of block j (ptr[j] .. ptr[j + 1]) of
//                   a[:, idx[slot_e]] @ op(values[slot_e]),  op = transpose or identity
//       (block column slabs of B). The forward pass is block_spmm over the block rows of the
//       layout with op = transpose (Y_r = sum_c X_c W_rc^T); dX is block_spmm over its block
//       columns with op = identity (dX_c = sum_r dY_r W_rc).
//   block_weight_grad(dy, x, row_ptr, row_slots, slot_cols, B) -> [S, B, B]
//       dW_s = dy[:, row of s]^T @ x[:, slot_cols[s]] for the kept blocks only.
//
// Everything is one register-tile kernel: an output tile of up to 6 rows x 16 lanes held in
// 12 AVX registers while the kept blocks stream past it, one FMA per lane per reduction
// step, each tile stored once. Vector lanes always run along a unit-stride axis of the
// output: along the block's columns for a row-major output (a Linear), along M for a
// column-major one (a convolution's channels-first output), so both orientations read their
// inputs through strides without copies. dW reduces over M: per chunk of M rows (small
// enough that the chunk of dy and x stays in L2 while every kept block reads it), a block
// row's dy slab and each kept block's x slab are packed into contiguous buffers and each
// block's [B, B] result is accumulated chunk by chunk.
//
// Work is split over output tiles (row chunks x blocks) with at::parallel_for, dW over ranges
// of M reduced into per-thread copies, so threads never wait on each other inside the loops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kRows = 6;      // tile rows (scalar operand, broadcast)
constexpr int kLanes = 16;    // tile lanes (vector operand, two AVX registers)
constexpr int64_t kRowChunk = 48;     // rows of a row-major output per work item
constexpr int64_t kLaneChunk = 256;   // columns (M) of a column-major output per work item
constexpr int64_t kGradChunk = 64;    // rows of M per packed chunk of the weight gradient

// One reduction segment: a kept block's scalar operand S[i, k] and vector operand V[k, j].
struct Segment {
  const float* s;
  const float* v;
};

struct LaneMask {
  __m256i low, high;
  explicit LaneMask(int lanes) {
    alignas(32) int32_t bits[kLanes];
    for (int j = 0; j < kLanes; ++j) bits[j] = j < lanes ? -1 : 0;
    low = _mm256_load_si256(reinterpret_cast<const __m256i*>(bits));
    high = _mm256_load_si256(reinterpret_cast<const __m256i*>(bits + 8));
  }
};

// out[i, 0:16] (=, or += with accumulate) sum over segments of sum_k S[i, k] V[k, 0:16],
// S[i, k] at s + s_offset + i * s_i + k * s_k, V[k, :] at v + v_offset + k * v_k.
template <int Rows, bool Masked>
inline void tile(const Segment* segments, int count, int64_t depth, int64_t s_offset, int64_t s_i, int64_t s_k,
                 int64_t v_offset, int64_t v_k, float* out, int64_t out_i, bool accumulate, const LaneMask& mask) {
  __m256 low[Rows], high[Rows];
  for (int i = 0; i < Rows; ++i) {
    low[i] = _mm256_setzero_ps();
    high[i] = _mm256_setzero_ps();
  }
  for (int g = 0; g < count; ++g) {
    const float* s = segments[g].s + s_offset;
    const float* v = segments[g].v + v_offset;
    for (int64_t k = 0; k < depth; ++k) {
      const __m256 v_low = Masked ? _mm256_maskload_ps(v, mask.low) : _mm256_loadu_ps(v);
      const __m256 v_high = Masked ? _mm256_maskload_ps(v + 8, mask.high) : _mm256_loadu_ps(v + 8);
      for (int i = 0; i < Rows; ++i) {
        const __m256 a = _mm256_broadcast_ss(s + i * s_i);
        low[i] = _mm256_fmadd_ps(a, v_low, low[i]);
        high[i] = _mm256_fmadd_ps(a, v_high, high[i]);
      }
      s += s_k;
      v += v_k;
    }
  }
  for (int i = 0; i < Rows; ++i) {
    float* o = out + i * out_i;
    if (Masked) {
      if (accumulate) {
        low[i] = _mm256_add_ps(low[i], _mm256_maskload_ps(o, mask.low));
        high[i] = _mm256_add_ps(high[i], _mm256_maskload_ps(o + 8, mask.high));
      }
      _mm256_maskstore_ps(o, mask.low, low[i]);
      _mm256_maskstore_ps(o + 8, mask.high, high[i]);
    } else {
      if (accumulate) {
        low[i] = _mm256_add_ps(low[i], _mm256_loadu_ps(o));
        high[i] = _mm256_add_ps(high[i], _mm256_loadu_ps(o + 8));
      }
      _mm256_storeu_ps(o, low[i]);
      _mm256_storeu_ps(o + 8, high[i]);
    }
  }
}

template <bool Masked>
inline void tile_rows(int rows, const Segment* segments, int count, int64_t depth, int64_t s_offset, int64_t s_i,
                      int64_t s_k, int64_t v_offset, int64_t v_k, float* out, int64_t out_i, bool accumulate,
                      const LaneMask& mask) {
  switch (rows) {
#define DSPARSE_TILE(R) \
  case R: tile<R, Masked>(segments, count, depth, s_offset, s_i, s_k, v_offset, v_k, out, out_i, accumulate, mask); break;
    DSPARSE_TILE(6) DSPARSE_TILE(5) DSPARSE_TILE(4) DSPARSE_TILE(3) DSPARSE_TILE(2) DSPARSE_TILE(1)
#undef DSPARSE_TILE
    default: break;
  }
}

inline void run_tile(int rows, int lanes, const Segment* segments, int count, int64_t depth, int64_t s_offset,
                     int64_t s_i, int64_t s_k, int64_t v_offset, int64_t v_k, float* out, int64_t out_i,
                     bool accumulate, const LaneMask& full, const LaneMask& partial) {
  if (lanes == kLanes) {
    tile_rows<false>(rows, segments, count, depth, s_offset, s_i, s_k, v_offset, v_k, out, out_i, accumulate, full);
  } else {
    tile_rows<true>(rows, segments, count, depth, s_offset, s_i, s_k, v_offset, v_k, out, out_i, accumulate, partial);
  }
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "dsparse CPU block kernels take float32 CPU "
              "tensors; ", name, " is ", t.scalar_type(), " on ", t.device());
}

std::vector<int64_t> host_ints(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

at::Tensor block_spmm(const at::Tensor& a_in, const at::Tensor& values_in, const at::Tensor& ptr_in,
                      const at::Tensor& slots_in, const at::Tensor& idx_in, bool transpose_w, bool column_major_out) {
  check_float(a_in, "the input");
  check_float(values_in, "the blocks");
  TORCH_CHECK(a_in.dim() == 2 && values_in.dim() == 3 && values_in.size(1) == values_in.size(2),
              "block_spmm takes a [M, K] and values [S, B, B]");
  const int64_t block = values_in.size(1);
  TORCH_CHECK(block % kLanes == 0, "block_spmm needs a block size that is a multiple of 16, got ", block);
  TORCH_CHECK(a_in.size(1) % block == 0, "block_spmm: the input's width ", a_in.size(1),
              " is not a whole number of blocks of ", block);
  const std::vector<int64_t> ptr = host_ints(ptr_in), slots = host_ints(slots_in), idx = host_ints(idx_in);
  const int64_t blocks_out = static_cast<int64_t>(ptr.size()) - 1;
  const int64_t m = a_in.size(0);
  const at::Tensor values = values_in.contiguous();
  for (int64_t slot : slots) TORCH_CHECK(slot >= 0 && slot < values.size(0), "block_spmm: slot out of range");
  for (int64_t column : idx) TORCH_CHECK(column >= 0 && column * block < a_in.size(1), "block_spmm: block index out of range");

  at::Tensor out = column_major_out ? at::empty({blocks_out * block, m}, a_in.options()).t()
                                    : at::empty({m, blocks_out * block}, a_in.options());
  if (m == 0 || blocks_out == 0) return out;
  const LaneMask full(kLanes);

  if (!column_major_out) {
    // Lanes along the block's output columns: V = op(W) rows, contiguous; S = a, any strides.
    const at::Tensor v_blocks = transpose_w ? values.transpose(1, 2).contiguous() : values;
    const float* v_base = v_blocks.data_ptr<float>();
    const float* a = a_in.data_ptr<float>();
    const int64_t a_row = a_in.stride(0), a_col = a_in.stride(1);
    float* y = out.data_ptr<float>();
    const int64_t ld = out.stride(0);
    const int64_t chunks = (m + kRowChunk - 1) / kRowChunk;
    at::parallel_for(0, chunks * blocks_out, 1, [&](int64_t begin, int64_t end) {
      std::vector<Segment> segments;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t chunk = item / blocks_out, j = item % blocks_out;
        const int64_t row0 = chunk * kRowChunk, row_end = std::min(m, row0 + kRowChunk);
        segments.clear();
        for (int64_t e = ptr[j]; e < ptr[j + 1]; ++e) {
          const int64_t slot = slots[e];
          segments.push_back({a + idx[slot] * block * a_col, v_base + slot * block * block});
        }
        for (int64_t row = row0; row < row_end; row += kRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kRows, row_end - row));
          for (int64_t lane = 0; lane < block; lane += kLanes) {
            float* o = y + row * ld + j * block + lane;
            if (segments.empty()) {
              for (int i = 0; i < rows; ++i) std::memset(o + i * ld, 0, kLanes * sizeof(float));
              continue;
            }
            tile_rows<false>(rows, segments.data(), static_cast<int>(segments.size()), block, row * a_row, a_row,
                             a_col, lane, block, o, ld, false, full);
          }
        }
      }
    });
    return out;
  }

  // Column-major output: lanes along M. out^T[j * B + n, m] = sum_k S[n, k] a^T[idx * B + k, m]
  // with S = op(W)^T, so a must have unit stride along M.
  const at::Tensor a_t = a_in.stride(0) == 1 ? a_in : a_in.t().contiguous().t();
  const float* a = a_t.data_ptr<float>();
  const int64_t a_col = a_t.stride(1);
  const float* w = values.data_ptr<float>();
  const int64_t s_i = transpose_w ? block : 1, s_k = transpose_w ? 1 : block;
  float* y = out.data_ptr<float>();  // out^T, row-major [J * B, M]
  const int64_t ld = out.stride(1);
  const int64_t chunks = (m + kLaneChunk - 1) / kLaneChunk;
  at::parallel_for(0, chunks * blocks_out, 1, [&](int64_t begin, int64_t end) {
    std::vector<Segment> segments;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / blocks_out, j = item % blocks_out;
      const int64_t col0 = chunk * kLaneChunk, col_end = std::min(m, col0 + kLaneChunk);
      segments.clear();
      for (int64_t e = ptr[j]; e < ptr[j + 1]; ++e) {
        const int64_t slot = slots[e];
        segments.push_back({w + slot * block * block, a + idx[slot] * block * a_col});
      }
      for (int64_t col = col0; col < col_end; col += kLanes) {
        const int lanes = static_cast<int>(std::min<int64_t>(kLanes, col_end - col));
        const LaneMask partial(lanes);
        for (int64_t row = 0; row < block; row += kRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kRows, block - row));
          float* o = y + (j * block + row) * ld + col;
          if (segments.empty()) {
            for (int i = 0; i < rows; ++i) std::memset(o + i * ld, 0, lanes * sizeof(float));
            continue;
          }
          run_tile(rows, lanes, segments.data(), static_cast<int>(segments.size()), block, row * s_i, s_i, s_k, col,
                   a_col, o, ld, false, full, partial);
        }
      }
    }
  });
  return out;
}

// Packs rows [row0, row0 + depth) of a [M, *] matrix's block-column slab (B columns from
// `first`) into a contiguous [depth, B] buffer.
void pack_rows(const float* first, int64_t row_stride, int64_t col_stride, int64_t row0, int64_t depth,
               int64_t block, float* packed) {
  for (int64_t r = 0; r < depth; ++r) {
    const float* src = first + (row0 + r) * row_stride;
    float* dst = packed + r * block;
    if (col_stride == 1) {
      std::memcpy(dst, src, block * sizeof(float));
    } else {
      for (int64_t k = 0; k < block; ++k) dst[k] = src[k * col_stride];
    }
  }
}

at::Tensor block_weight_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr_in,
                             const at::Tensor& row_slots_in, const at::Tensor& slot_cols_in, int64_t block) {
  check_float(dy, "the output gradient");
  check_float(x, "the input");
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0), "block_weight_grad takes dy [M, R * B] and "
              "x [M, C * B]");
  TORCH_CHECK(block % kLanes == 0, "block_weight_grad needs a block size that is a multiple of 16, got ", block);
  const std::vector<int64_t> row_ptr = host_ints(row_ptr_in), row_slots = host_ints(row_slots_in),
                             slot_cols = host_ints(slot_cols_in);
  const int64_t slots = static_cast<int64_t>(slot_cols.size()), m = x.size(0);
  const int64_t block_rows = static_cast<int64_t>(row_ptr.size()) - 1;
  TORCH_CHECK(static_cast<int64_t>(row_slots.size()) == slots && block_rows * block <= dy.size(1),
              "block_weight_grad: the layout does not match the operands");
  for (int64_t slot : row_slots) TORCH_CHECK(slot >= 0 && slot < slots, "block_weight_grad: slot out of range");
  for (int64_t column : slot_cols) {
    TORCH_CHECK(column >= 0 && (column + 1) * block <= x.size(1), "block_weight_grad: a slot lies outside x");
  }
  at::Tensor out = at::zeros({slots, block, block}, x.options());
  if (m == 0 || slots == 0) return out;
  const float* g = dy.data_ptr<float>();
  const int64_t g_row = dy.stride(0), g_col = dy.stride(1);
  const float* xp = x.data_ptr<float>();
  const int64_t x_row = x.stride(0), x_col = x.stride(1);
  const LaneMask full(kLanes);
  // Split-K over M: each thread reduces its own range of rows into its own copy of dW (no
  // barrier until the end), walking chunks of rows so that the chunk of dy and x it reads
  // stays in cache while every kept block uses it; the copies are summed at the end.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (m + kGradChunk - 1) / kGradChunk));
  const int64_t rows_per_part = (((m + parts - 1) / parts + kGradChunk - 1) / kGradChunk) * kGradChunk;
  at::Tensor partial = parts > 1 ? at::zeros({parts - 1, slots, block, block}, x.options()) : at::Tensor();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> packed_dy(kGradChunk * block), packed_x(kGradChunk * block);
    for (int64_t part = begin; part < end; ++part) {
      float* result = part == 0 ? out.data_ptr<float>() : partial[part - 1].data_ptr<float>();
      const int64_t first = part * rows_per_part, last = std::min(m, first + rows_per_part);
      for (int64_t row0 = first; row0 < last; row0 += kGradChunk) {
        const int64_t depth = std::min(kGradChunk, last - row0);
        const bool accumulate = row0 > first;
        for (int64_t row = 0; row < block_rows; ++row) {
          if (row_ptr[row] == row_ptr[row + 1]) continue;
          pack_rows(g + row * block * g_col, g_row, g_col, row0, depth, block, packed_dy.data());
          for (int64_t e = row_ptr[row]; e < row_ptr[row + 1]; ++e) {
            const int64_t slot = row_slots[e];
            pack_rows(xp + slot_cols[slot] * block * x_col, x_row, x_col, row0, depth, block, packed_x.data());
            const Segment segment{packed_dy.data(), packed_x.data()};
            float* o = result + slot * block * block;
            // S[n, r] = dy[row0 + r, row * B + n], V[r, k] = x[row0 + r, col * B + k].
            for (int64_t n = 0; n < block; n += kRows) {
              const int rows = static_cast<int>(std::min<int64_t>(kRows, block - n));
              for (int64_t lane = 0; lane < block; lane += kLanes) {
                tile_rows<false>(rows, &segment, 1, depth, n, 1, block, lane, block, o + n * block + lane, block,
                                 accumulate, full);
              }
            }
          }
        }
      }
    }
  });
  if (parts > 1) out.add_(partial.sum(0));
  return out;
}

}  // namespace

TORCH_LIBRARY(dsparse_cpu, m) {
  m.def("block_spmm(Tensor a, Tensor values, Tensor ptr, Tensor slots, Tensor idx, bool transpose_w, "
        "bool column_major_out) -> Tensor");
  m.def("block_weight_grad(Tensor dy, Tensor x, Tensor row_ptr, Tensor row_slots, Tensor slot_cols, int block) -> "
        "Tensor");
}

TORCH_LIBRARY_IMPL(dsparse_cpu, CPU, m) {
  m.impl("block_spmm", &block_spmm);
  m.impl("block_weight_grad", &block_weight_grad);
}
