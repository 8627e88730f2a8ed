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
//   block_conv_forward / block_conv_input_grad / block_conv_weight_grad
//       the same three products for a convolution as implicit GEMM over a channels-last
//       input whose channels are a multiple of B (see the section below): no im2col.
//   block_conv(x, values, <row walk>, <column walk>, out_channels, conv) -> y
//       the differentiable convolution over those three, NCHW in and out (channels-last
//       memory out), its autograd in C++ (the end of this file): a Python autograd.Function
//       cost a layer more per call than a small convolution's kernels.
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
#include <torch/autograd.h>
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

void check_layout(const std::vector<int64_t>& ptr, const std::vector<int64_t>& slots, int64_t num_slots,
                  const char* op) {
  TORCH_CHECK(static_cast<int64_t>(slots.size()) == num_slots && !ptr.empty() && ptr.front() == 0 &&
              ptr.back() == num_slots, op, ": the layout does not match the blocks");
  for (size_t i = 1; i < ptr.size(); ++i) TORCH_CHECK(ptr[i - 1] <= ptr[i], op, ": the layout's pointers decrease");
  for (int64_t slot : slots) TORCH_CHECK(slot >= 0 && slot < num_slots, op, ": slot out of range");
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
  check_layout(ptr, slots, values.size(0), "block_spmm");
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
// `first`) into a contiguous [depth, B] buffer, reading along the source's unit stride (a
// column-major source is read one column at a time, each a contiguous run of rows).
void pack_rows(const float* first, int64_t row_stride, int64_t col_stride, int64_t row0, int64_t depth,
               int64_t block, float* packed) {
  if (col_stride == 1) {
    for (int64_t r = 0; r < depth; ++r) {
      std::memcpy(packed + r * block, first + (row0 + r) * row_stride, block * sizeof(float));
    }
  } else if (row_stride == 1) {
    for (int64_t k = 0; k < block; ++k) {
      const float* src = first + k * col_stride + row0;
      for (int64_t r = 0; r < depth; ++r) packed[r * block + k] = src[r];
    }
  } else {
    for (int64_t r = 0; r < depth; ++r) {
      for (int64_t k = 0; k < block; ++k) packed[r * block + k] = first[(row0 + r) * row_stride + k * col_stride];
    }
  }
}

// dW over M, split-K: each thread reduces its own range of rows into its own copy of dW (no
// barrier until the end), walking chunks of rows so that the chunk of dy and x it reads stays
// in cache while every kept block uses it; the copies are summed at the end. `pack_x(slot,
// row0, depth, packed)` writes rows [row0, row0 + depth) of the slot's x slab, [depth, B].
template <class PackX>
at::Tensor weight_grad_split_k(const at::Tensor& dy, int64_t m, const std::vector<int64_t>& row_ptr,
                               const std::vector<int64_t>& row_slots, int64_t slots, int64_t block,
                               const PackX& pack_x) {
  at::Tensor out = at::zeros({slots, block, block}, dy.options());
  if (m == 0 || slots == 0) return out;
  const float* g = dy.data_ptr<float>();
  const int64_t g_row = dy.stride(0), g_col = dy.stride(1);
  const int64_t block_rows = static_cast<int64_t>(row_ptr.size()) - 1;
  const LaneMask full(kLanes);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (m + kGradChunk - 1) / kGradChunk));
  const int64_t rows_per_part = (((m + parts - 1) / parts + kGradChunk - 1) / kGradChunk) * kGradChunk;
  at::Tensor partial = parts > 1 ? at::zeros({parts - 1, slots, block, block}, dy.options()) : at::Tensor();
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
            pack_x(slot, row0, depth, packed_x.data());
            const Segment segment{packed_dy.data(), packed_x.data()};
            float* o = result + slot * block * block;
            // S[n, r] = dy[row0 + r, row * B + n], V[r, k] = x slab[row0 + r, k].
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


at::Tensor block_weight_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr_in,
                             const at::Tensor& row_slots_in, const at::Tensor& slot_cols_in, int64_t block) {
  check_float(dy, "the output gradient");
  check_float(x, "the input");
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0), "block_weight_grad takes dy [M, R * B] and "
              "x [M, C * B]");
  TORCH_CHECK(block % kLanes == 0, "block_weight_grad needs a block size that is a multiple of 16, got ", block);
  const std::vector<int64_t> row_ptr = host_ints(row_ptr_in), row_slots = host_ints(row_slots_in),
                             slot_cols = host_ints(slot_cols_in);
  const int64_t slots = static_cast<int64_t>(slot_cols.size());
  check_layout(row_ptr, row_slots, slots, "block_weight_grad");
  TORCH_CHECK((static_cast<int64_t>(row_ptr.size()) - 1) * block <= dy.size(1),
              "block_weight_grad: the layout has more block rows than dy");
  for (int64_t column : slot_cols) {
    TORCH_CHECK(column >= 0 && (column + 1) * block <= x.size(1), "block_weight_grad: a slot lies outside x");
  }
  const float* xp = x.data_ptr<float>();
  const int64_t x_row = x.stride(0), x_col = x.stride(1);
  return weight_grad_split_k(dy, x.size(0), row_ptr, row_slots, slots, block,
                             [&](int64_t slot, int64_t row0, int64_t depth, float* packed) {
                               pack_rows(xp + slot_cols[slot] * block * x_col, x_row, x_col, row0, depth, block,
                                         packed);
                             });
}

// ---- Convolutions as implicit GEMM over a channels-last (NHWC) input -------------------
//
// The GEMM view of a convolution has K = taps x input channels (taps outer). When the input
// channels are a multiple of B, each block column is one tap and B consecutive channels, so a
// row of the im2col slab a kept block reads is B contiguous floats of one input pixel (or zero
// padding): the kernels gather those rows through pointers instead of building the im2col.

struct Conv {
  int64_t batch, height, width, channels, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w;

  Conv(c10::IntArrayRef nhwc, c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding,
       c10::IntArrayRef dilation)
      : batch(nhwc[0]), height(nhwc[1]), width(nhwc[2]), channels(nhwc[3]), kh(kernel[0]), kw(kernel[1]),
        sh(stride[0]), sw(stride[1]), ph(padding[0]), pw(padding[1]), dh(dilation[0]), dw(dilation[1]) {
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
    TORCH_CHECK(out_h > 0 && out_w > 0, "block-sparse conv: the kernel does not fit the padded input");
  }

  int64_t outputs() const { return batch * out_h * out_w; }

  // Where output pixel m's receptive field starts: its image's first input row, and the
  // input row and column of its top-left tap (negative inside the padding). Computed once
  // per output pixel (or stepped with next), so the per-tap lookups below do no division.
  struct Window {
    int64_t image_row, y, x;
  };

  Window window(int64_t m) const {
    const int64_t ox = m % out_w, oy = (m / out_w) % out_h, n = m / (out_w * out_h);
    return {n * height, oy * sh - ph, ox * sw - pw};
  }

  void next(Window& w) const {  // the window of the next output pixel
    w.x += sw;
    if (w.x > (out_w - 1) * sw - pw) {
      w.x = -pw;
      w.y += sh;
      if (w.y > (out_h - 1) * sh - ph) {
        w.y = -ph;
        w.image_row += height;
      }
    }
  }

  // The input pixel window w reads at a tap's offsets (ty, tx) = (ky * dh, kx * dw), or -1
  // where it reads zero padding.
  int64_t pixel(const Window& w, int64_t ty, int64_t tx) const {
    const int64_t iy = w.y + ty, ix = w.x + tx;
    if (static_cast<uint64_t>(iy) >= static_cast<uint64_t>(height) ||
        static_cast<uint64_t>(ix) >= static_cast<uint64_t>(width)) {
      return -1;
    }
    return (w.image_row + iy) * width + ix;
  }
};

alignas(64) const float kZeros[256] = {};

// out[i, 0:16] (i < rows) = sum over segments g of sum_k rows[g][i][k] V_g[k, 0:16]: the
// scalar operand's rows come through pointers (gathered pixels, zero padding), k along unit
// stride. All kRows row pointers of a segment must be readable (kZeros past the tile): the
// tile always runs six rows, in twelve named accumulators, because GCC kept an array of
// them in registers only with stack copies stored at every step (half the FMA rate).
inline void gather_tile(int rows, const float* const* s, const float* const* v, int count, int64_t depth,
                        int64_t v_offset, int64_t v_k, float* out, int64_t out_i) {
  static_assert(kRows == 6, "gather_tile names six rows");
  __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0, l3 = l0, h3 = l0, l4 = l0, h4 = l0,
         l5 = l0, h5 = l0;
  for (int g = 0; g < count; ++g) {
    const float* const* r = s + g * kRows;
    const float *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3], *r4 = r[4], *r5 = r[5];
    const float* vk = v[g] + v_offset;
    for (int64_t k = 0; k < depth; ++k, vk += v_k) {
      const __m256 vl = _mm256_loadu_ps(vk), vh = _mm256_loadu_ps(vk + 8);
#define DSPARSE_ROW(I)                                 \
  {                                                    \
    const __m256 a = _mm256_broadcast_ss(r##I + k);    \
    l##I = _mm256_fmadd_ps(a, vl, l##I);               \
    h##I = _mm256_fmadd_ps(a, vh, h##I);               \
  }
      DSPARSE_ROW(0) DSPARSE_ROW(1) DSPARSE_ROW(2) DSPARSE_ROW(3) DSPARSE_ROW(4) DSPARSE_ROW(5)
#undef DSPARSE_ROW
    }
  }
  const __m256 low[kRows] = {l0, l1, l2, l3, l4, l5}, high[kRows] = {h0, h1, h2, h3, h4, h5};
  for (int i = 0; i < rows; ++i) {
    _mm256_storeu_ps(out + i * out_i, low[i]);
    _mm256_storeu_ps(out + i * out_i + 8, high[i]);
  }
}

// A kept block's place in the GEMM view: the tap of its block column (its input offsets
// ty = ky * dh, tx = kx * dw) and the column's first channel.
struct Tap {
  int64_t ty, tx, channel;
};

Tap tap_of(int64_t column, int64_t block, const Conv& conv) {
  const int64_t tap = column * block / conv.channels;
  return {(tap / conv.kw) * conv.dh, (tap % conv.kw) * conv.dw, column * block % conv.channels};
}

void check_conv_operands(const at::Tensor& x, const at::Tensor& values, const Conv& conv, const char* op) {
  check_float(values, "the blocks");
  TORCH_CHECK(values.dim() == 3 && values.size(1) == values.size(2) && values.is_contiguous(), op,
              " takes contiguous values [S, B, B]");
  const int64_t block = values.size(1);
  TORCH_CHECK(block % kLanes == 0 && block <= 256, op, " needs a block size that is a multiple of 16, got ", block);
  TORCH_CHECK(conv.channels % block == 0, op, " needs input channels that are a multiple of the block (",
              conv.channels, " channels, blocks of ", block, "); use the im2col path");
  (void)x;
}

// Y [N * Ho * Wo, R * B] (channels-last rows) of the block-sparse convolution of x (NHWC).
at::Tensor block_conv_forward(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& row_ptr_in,
                              const at::Tensor& row_slots_in, const at::Tensor& slot_cols_in,
                              c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding,
                              c10::IntArrayRef dilation) {
  check_float(x_in, "the input");
  TORCH_CHECK(x_in.dim() == 4, "block_conv_forward takes x [N, H, W, C] (channels last)");
  const at::Tensor x = x_in.contiguous();
  const Conv conv(x.sizes(), kernel, stride, padding, dilation);
  check_conv_operands(x, values, conv, "block_conv_forward");
  const int64_t block = values.size(1);
  const std::vector<int64_t> ptr = host_ints(row_ptr_in), slots = host_ints(row_slots_in),
                             cols = host_ints(slot_cols_in);
  check_layout(ptr, slots, values.size(0), "block_conv_forward");
  const int64_t taps_k = conv.kh * conv.kw * conv.channels;
  for (int64_t c : cols) TORCH_CHECK(c >= 0 && (c + 1) * block <= taps_k, "block_conv_forward: a slot lies outside K");
  const int64_t blocks_out = static_cast<int64_t>(ptr.size()) - 1, m = conv.outputs();
  at::Tensor out = at::empty({m, blocks_out * block}, x.options());
  if (m == 0 || blocks_out == 0) return out;
  const at::Tensor v_blocks = values.transpose(1, 2).contiguous();  // V[k][n] = W[n][k]
  const float* vb = v_blocks.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const int64_t ld = out.stride(0);
  const int64_t chunks = (m + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, chunks * blocks_out, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> rows, v;
    std::vector<Tap> taps;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / blocks_out, j = item % blocks_out;
      const int64_t row0 = chunk * kRowChunk, row_end = std::min(m, row0 + kRowChunk);
      const int count = static_cast<int>(ptr[j + 1] - ptr[j]);
      taps.clear();
      v.clear();
      for (int64_t e = ptr[j]; e < ptr[j + 1]; ++e) {
        taps.push_back(tap_of(cols[slots[e]], block, conv));
        v.push_back(vb + slots[e] * block * block);
      }
      rows.assign(static_cast<size_t>(count) * kRows, kZeros);
      for (int64_t row = row0; row < row_end; row += kRows) {
        const int tile = static_cast<int>(std::min<int64_t>(kRows, row_end - row));
        if (count == 0) {
          for (int i = 0; i < tile; ++i) std::memset(y + (row + i) * ld + j * block, 0, block * sizeof(float));
          continue;
        }
        Conv::Window windows[kRows];
        windows[0] = conv.window(row);
        for (int i = 1; i < tile; ++i) {
          windows[i] = windows[i - 1];
          conv.next(windows[i]);
        }
        for (int g = 0; g < count; ++g) {
          for (int i = 0; i < tile; ++i) {
            const int64_t pixel = conv.pixel(windows[i], taps[g].ty, taps[g].tx);
            rows[g * kRows + i] = pixel < 0 ? kZeros : xp + pixel * conv.channels + taps[g].channel;
          }
        }
        for (int64_t lane = 0; lane < block; lane += kLanes) {
          gather_tile(tile, rows.data(), v.data(), count, block, lane, block, y + row * ld + j * block + lane, ld);
        }
      }
    }
  });
  return out;
}

// dX (NHWC) of the block-sparse convolution: each input pixel gathers, per tap, the dy row of
// the output that read it (the transposed convolution), so no two threads write one pixel.
// Pixels are walked in lines of one image row and one phase of the stride (ix = phase,
// phase + sw, ...), so that for each tap either every pixel of a tile has an output that read
// it or none has, and the taps none has are skipped: a stride-2 layer does not multiply the
// three quarters of (pixel, tap) pairs that no output reads.
at::Tensor block_conv_input_grad(const at::Tensor& dy_in, const at::Tensor& values, const at::Tensor& col_ptr_in,
                                 const at::Tensor& col_slots_in, const at::Tensor& slot_rows_in,
                                 c10::IntArrayRef x_shape, c10::IntArrayRef kernel, c10::IntArrayRef stride,
                                 c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_float(dy_in, "the output gradient");
  const at::Tensor dy = dy_in.contiguous();
  const Conv conv(x_shape, kernel, stride, padding, dilation);
  check_conv_operands(dy, values, conv, "block_conv_input_grad");
  const int64_t block = values.size(1);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == conv.outputs(), "block_conv_input_grad takes dy [N * Ho * Wo, R * B]");
  const std::vector<int64_t> ptr = host_ints(col_ptr_in), slots = host_ints(col_slots_in),
                             block_rows = host_ints(slot_rows_in);
  check_layout(ptr, slots, values.size(0), "block_conv_input_grad");
  const int64_t taps = conv.kh * conv.kw, channel_blocks = conv.channels / block;
  TORCH_CHECK(static_cast<int64_t>(ptr.size()) - 1 == taps * channel_blocks,
              "block_conv_input_grad: the layout's block columns do not match the convolution");
  for (int64_t r : block_rows) TORCH_CHECK(r >= 0 && (r + 1) * block <= dy.size(1), "block_conv_input_grad: a slot lies outside dy");
  at::Tensor out = at::empty({conv.batch, conv.height, conv.width, conv.channels}, dy.options());
  if (out.numel() == 0) return out;
  const float* g = dy.data_ptr<float>();
  const int64_t ld_dy = dy.stride(0);
  const float* w = values.data_ptr<float>();
  float* dx = out.data_ptr<float>();
  const int64_t phases = std::min(conv.sw, conv.width);
  const int64_t lines = conv.batch * conv.height * phases;
  at::parallel_for(0, lines * channel_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> v, active_rows, active_v;
    std::vector<int64_t> seg_dy, seg_x0;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t line = item / channel_blocks, jc = item % channel_blocks;
      const int64_t phase = line % phases, image_row = line / phases;  // image_row = n * H + iy
      const int64_t n = image_row / conv.height, iy = image_row % conv.height;
      const int64_t first_pixel = image_row * conv.width + phase;
      const int64_t count_pixels = (conv.width - phase + conv.sw - 1) / conv.sw;
      // The segments whose tap reaches this line from some output row and column phase:
      // their dy rows start at seg_dy (output row oy, column 0, the block row's channels),
      // and pixel q of the line reads output column seg_x0 + q.
      seg_dy.clear();
      seg_x0.clear();
      v.clear();
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t y = iy + conv.ph - (tap / conv.kw) * conv.dh, x = phase + conv.pw - (tap % conv.kw) * conv.dw;
        if (y < 0 || y % conv.sh != 0 || y / conv.sh >= conv.out_h || x % conv.sw != 0) continue;
        const int64_t column = tap * channel_blocks + jc;
        for (int64_t e = ptr[column]; e < ptr[column + 1]; ++e) {
          seg_dy.push_back((n * conv.out_h + y / conv.sh) * conv.out_w * ld_dy + block_rows[slots[e]] * block);
          seg_x0.push_back(x / conv.sw);
          v.push_back(w + slots[e] * block * block);  // V[n][k] = W[n][k]: lanes along k
        }
      }
      const int count = static_cast<int>(v.size());
      const int64_t pixel_step = conv.sw * conv.channels;
      for (int64_t q = 0; q < count_pixels; q += kRows) {
        const int tile = static_cast<int>(std::min<int64_t>(kRows, count_pixels - q));
        const int64_t p = first_pixel + q * conv.sw;
        float* o = dx + p * conv.channels + jc * block;
        active_rows.clear();
        active_v.clear();
        for (int s = 0; s < count; ++s) {
          bool any = false;
          const float* tile_rows[kRows];
          for (int i = 0; i < kRows; ++i) tile_rows[i] = kZeros;
          for (int i = 0; i < tile; ++i) {
            const int64_t ox = seg_x0[s] + q + i;
            if (static_cast<uint64_t>(ox) < static_cast<uint64_t>(conv.out_w)) {
              tile_rows[i] = g + seg_dy[s] + ox * ld_dy;
              any = true;
            }
          }
          if (!any) continue;
          active_rows.insert(active_rows.end(), tile_rows, tile_rows + kRows);
          active_v.push_back(v[s]);
        }
        if (active_v.empty()) {
          for (int i = 0; i < tile; ++i) std::memset(o + i * pixel_step, 0, block * sizeof(float));
          continue;
        }
        for (int64_t lane = 0; lane < block; lane += kLanes) {
          gather_tile(tile, active_rows.data(), active_v.data(), static_cast<int>(active_v.size()), block, lane,
                           block, o + lane, pixel_step);
        }
      }
    }
  });
  return out;
}

// dW of the kept blocks: the split-K reduction with each block's x slab gathered from the
// pixels its tap reads.
at::Tensor block_conv_weight_grad(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& row_ptr_in,
                                  const at::Tensor& row_slots_in, const at::Tensor& slot_cols_in, int64_t block,
                                  c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                  c10::IntArrayRef dilation) {
  check_float(dy_in, "the output gradient");
  check_float(x_in, "the input");
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  TORCH_CHECK(x.dim() == 4, "block_conv_weight_grad takes x [N, H, W, C] (channels last)");
  const Conv conv(x.sizes(), kernel, stride, padding, dilation);
  TORCH_CHECK(block % kLanes == 0 && conv.channels % block == 0, "block_conv_weight_grad needs input channels that "
              "are a multiple of a block of 16, 32 or 64");
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == conv.outputs(), "block_conv_weight_grad takes dy [N * Ho * Wo, R * B]");
  const std::vector<int64_t> row_ptr = host_ints(row_ptr_in), row_slots = host_ints(row_slots_in),
                             cols = host_ints(slot_cols_in);
  const int64_t slots = static_cast<int64_t>(cols.size());
  check_layout(row_ptr, row_slots, slots, "block_conv_weight_grad");
  TORCH_CHECK((static_cast<int64_t>(row_ptr.size()) - 1) * block <= dy.size(1),
              "block_conv_weight_grad: the layout has more block rows than dy");
  const int64_t taps_k = conv.kh * conv.kw * conv.channels;
  for (int64_t c : cols) TORCH_CHECK(c >= 0 && (c + 1) * block <= taps_k, "block_conv_weight_grad: a slot lies outside K");
  const float* xp = x.data_ptr<float>();
  return weight_grad_split_k(dy, conv.outputs(), row_ptr, row_slots, slots, block,
                             [&](int64_t slot, int64_t row0, int64_t depth, float* packed) {
                               const Tap tap = tap_of(cols[slot], block, conv);
                               Conv::Window window = conv.window(row0);
                               for (int64_t r = 0; r < depth; ++r, conv.next(window)) {
                                 const int64_t pixel = conv.pixel(window, tap.ty, tap.tx);
                                 const float* src = pixel < 0 ? kZeros : xp + pixel * conv.channels + tap.channel;
                                 std::memcpy(packed + r * block, src, block * sizeof(float));
                               }
                             });
}


// The differentiable block-sparse convolution: x [N, C, H, W] (any memory format) to
// y [N, O, Ho, Wo] in channels-last memory, so a network of these passes activations and
// gradients on without copies. The autograd node is C++, so a layer's forward and backward
// cost one dispatcher call each beyond their kernels. The three products are called through
// the dispatcher, so tracing (torch.compile, fake tensors) sees them as operators.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor conv_output_layout(const at::Tensor& rows, int64_t out_channels, c10::IntArrayRef x_nhwc,
                              c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding,
                              c10::IntArrayRef dilation) {
  const Conv conv(x_nhwc, kernel, stride, padding, dilation);
  at::Tensor y = rows.view({conv.batch, conv.out_h, conv.out_w, rows.size(1)});
  if (y.size(3) != out_channels) y = y.narrow(3, 0, out_channels).contiguous();  // edge-block padding
  return y.permute({0, 3, 1, 2});
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                                          c10::IntArrayRef, c10::IntArrayRef)>&
forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dsparse_cpu::block_conv_forward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                                               c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef)>();
  return op;
}

class BlockConvFunction : public torch::autograd::Function<BlockConvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& row_ptr, const at::Tensor& row_slots, const at::Tensor& slot_cols,
                            const at::Tensor& col_ptr, const at::Tensor& col_slots, const at::Tensor& slot_rows,
                            int64_t out_channels, c10::IntArrayRef kernel, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, c10::IntArrayRef dilation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor x_nhwc = x.permute({0, 2, 3, 1}).contiguous();  // a view when x is channels-last
    const at::Tensor rows = forward_op().call(x_nhwc, values, row_ptr, row_slots, slot_cols, kernel, stride, padding,
                                              dilation);
    ctx->save_for_backward({x_nhwc, values, row_ptr, row_slots, slot_cols, col_ptr, col_slots, slot_rows});
    ctx->saved_data["out_channels"] = out_channels;
    ctx->saved_data["conv"] = std::vector<int64_t>{kernel[0], kernel[1], stride[0],  stride[1],
                                                   padding[0], padding[1], dilation[0], dilation[1]};
    return conv_output_layout(rows, out_channels, x_nhwc.sizes(), kernel, stride, padding, dilation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto input_grad = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("dsparse_cpu::block_conv_input_grad", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                                                   c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                                                   c10::IntArrayRef)>();
    static auto weight_grad = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("dsparse_cpu::block_conv_weight_grad", "")
                                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&, int64_t, c10::IntArrayRef,
                                                    c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef)>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x_nhwc = saved[0], &values = saved[1];
    const int64_t out_channels = ctx->saved_data["out_channels"].toInt();
    const std::vector<int64_t> conv = ctx->saved_data["conv"].toIntVector();
    const c10::IntArrayRef kernel(conv.data(), 2), stride(conv.data() + 2, 2), padding(conv.data() + 4, 2),
        dilation(conv.data() + 6, 2);
    variable_list result(13);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return result;
    const int64_t block = values.size(1), width = (saved[2].size(0) - 1) * block;
    at::Tensor dy;
    if (width == out_channels) {
      dy = grad.permute({0, 2, 3, 1}).contiguous();  // a view when grad is channels-last
    } else {
      dy = at::zeros({grad.size(0), grad.size(2), grad.size(3), width}, grad.options());
      dy.narrow(3, 0, out_channels).copy_(grad.permute({0, 2, 3, 1}));
    }
    dy = dy.view({-1, width});
    if (ctx->needs_input_grad(0)) {
      result[0] = input_grad.call(dy, values, saved[5], saved[6], saved[7], x_nhwc.sizes(), kernel, stride, padding,
                                  dilation)
                      .permute({0, 3, 1, 2});
    }
    if (ctx->needs_input_grad(1)) {
      result[1] = weight_grad.call(dy, x_nhwc, saved[2], saved[3], saved[4], block, kernel, stride, padding, dilation);
    }
    return result;
  }
};

// Below autograd (inference mode): the forward alone.
at::Tensor block_conv_inference(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                                const at::Tensor& row_slots, const at::Tensor& slot_cols, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, int64_t out_channels, c10::IntArrayRef kernel,
                                c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const at::Tensor x_nhwc = x.permute({0, 2, 3, 1}).contiguous();
  const at::Tensor rows = forward_op().call(x_nhwc, values, row_ptr, row_slots, slot_cols, kernel, stride, padding,
                                            dilation);
  return conv_output_layout(rows, out_channels, x_nhwc.sizes(), kernel, stride, padding, dilation);
}

at::Tensor block_conv_autograd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                               const at::Tensor& row_slots, const at::Tensor& slot_cols, const at::Tensor& col_ptr,
                               const at::Tensor& col_slots, const at::Tensor& slot_rows, int64_t out_channels,
                               c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation) {
  return BlockConvFunction::apply(x, values, row_ptr, row_slots, slot_cols, col_ptr, col_slots, slot_rows,
                                  out_channels, kernel, stride, padding, dilation);
}

}  // namespace

TORCH_LIBRARY(dsparse_cpu, m) {
  m.def("block_spmm(Tensor a, Tensor values, Tensor ptr, Tensor slots, Tensor idx, bool transpose_w, "
        "bool column_major_out) -> Tensor");
  m.def("block_weight_grad(Tensor dy, Tensor x, Tensor row_ptr, Tensor row_slots, Tensor slot_cols, int block) -> "
        "Tensor");
  m.def("block_conv_forward(Tensor x, Tensor values, Tensor row_ptr, Tensor row_slots, Tensor slot_cols, "
        "int[] kernel, int[] stride, int[] padding, int[] dilation) -> Tensor");
  m.def("block_conv_input_grad(Tensor dy, Tensor values, Tensor col_ptr, Tensor col_slots, Tensor slot_rows, "
        "int[] x_shape, int[] kernel, int[] stride, int[] padding, int[] dilation) -> Tensor");
  m.def("block_conv_weight_grad(Tensor dy, Tensor x, Tensor row_ptr, Tensor row_slots, Tensor slot_cols, int block, "
        "int[] kernel, int[] stride, int[] padding, int[] dilation) -> Tensor");
  m.def("block_conv(Tensor x, Tensor values, Tensor row_ptr, Tensor row_slots, Tensor slot_cols, Tensor col_ptr, "
        "Tensor col_slots, Tensor slot_rows, int out_channels, int[] kernel, int[] stride, int[] padding, "
        "int[] dilation) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsparse_cpu, CPU, m) {
  m.impl("block_spmm", &block_spmm);
  m.impl("block_weight_grad", &block_weight_grad);
  m.impl("block_conv_forward", &block_conv_forward);
  m.impl("block_conv_input_grad", &block_conv_input_grad);
  m.impl("block_conv_weight_grad", &block_conv_weight_grad);
  m.impl("block_conv", &block_conv_inference);
}

TORCH_LIBRARY_IMPL(dsparse_cpu, Autograd, m) {
  m.impl("block_conv", &block_conv_autograd);
}
