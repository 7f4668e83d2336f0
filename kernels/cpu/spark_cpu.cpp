// SparK's CPU kernels: decode attention and prefix unpacking straight from the compact records.
//
// The layout is kernels/layout.py's; Python (kernels/cpp_path.py) hands typed views of each record
// part (kept entries, bitmap words, sign words, fill), the window-statistics table and the slot
// rows, and this file reads them through their strides. Nothing here allocates per-token dense
// keys: a slot-head's key (or value) is rebuilt into one D-float scratch row in L1, scored, and
// forgotten. The score is the compressed-domain sum of kernels/reference.py
// (``compressed_logits``): kept entries as stored, a pruned channel c of token t as
// ``sign_{t,c} * min(fill_t * Qn_c^-1/2, max)``, all in float32.
//
// Two builds of this one source: the native one (-march=native: AVX-512 expand-loads place a
// 16-channel group's kept entries in one instruction, PDEP spreads its sign bits) and a portable
// one (SPARK_PORTABLE: plain loops), tested against each other and the reference.
//
// Decode is split over (request, KV head, fixed-size split of the request's tokens): each task
// writes a normalised partial output and its log-sum-exp, merged per request afterwards. The split
// size is fixed, so a request's result does not depend on the batch around it or on the number of
// threads.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__BMI2__) && !defined(SPARK_PORTABLE)
#include <immintrin.h>
#define SPARK_AVX512 1
#else
#define SPARK_AVX512 0
#endif

namespace {

constexpr int kMaxHeadDim = 256;
constexpr float kMinNormal = std::numeric_limits<float>::min();  // reference.MIN_NORM

// ---------------------------------------------------------------------------------------------
// Record parts, read through a view's strides
// ---------------------------------------------------------------------------------------------

// One record part ``[S, H, n]`` (or ``[S, H]`` for the fill): base pointer and byte strides.
struct Part {
  const uint8_t* base = nullptr;
  int64_t slot_stride = 0, head_stride = 0;  // bytes
  int64_t count = 0;                          // entries per slot-head (last dim; 1 for the fill)

  bool present() const { return base != nullptr; }
  const uint8_t* at(int64_t slot, int64_t head) const { return base + slot * slot_stride + head * head_stride; }
};

Part part_of(const at::Tensor& t, int64_t slots) {
  Part p;
  if (!t.defined() || t.numel() == 0) return p;
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, "record part must be [S, H] or [S, H, n], got ", t.sizes());
  TORCH_CHECK(t.size(0) == slots, "record parts disagree on the number of slots");
  if (t.dim() == 3) TORCH_CHECK(t.stride(2) == 1, "record part's last dim must be contiguous");
  const int64_t e = t.element_size();
  p.base = static_cast<const uint8_t*>(t.data_ptr());
  p.slot_stride = t.stride(0) * e;
  p.head_stride = t.stride(1) * e;
  p.count = t.dim() == 3 ? t.size(2) : 1;
  return p;
}

enum class Storage { F32, F16, BF16, E4M3, E5M2 };

Storage storage_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Storage::F32;
    case at::kHalf: return Storage::F16;
    case at::kBFloat16: return Storage::BF16;
    case at::kFloat8_e4m3fn: return Storage::E4M3;
    case at::kFloat8_e5m2: return Storage::E5M2;
    default: TORCH_CHECK(false, "unsupported KV storage dtype ", t);
  }
}

float bf16_to_float(uint16_t bits) {
  uint32_t w = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

// Stored entries -> float32 (FP8 times its scale: reference.from_storage).
void load_entries(const uint8_t* src, int64_t n, Storage s, float scale, float* dst) {
  switch (s) {
    case Storage::F32: std::memcpy(dst, src, n * 4); return;
    case Storage::BF16: {
      const auto* p = reinterpret_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(p[i]);
      return;
    }
    case Storage::F16: {
      const auto* p = reinterpret_cast<const c10::Half*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = float(p[i]);
      return;
    }
    case Storage::E4M3: {
      const auto* p = reinterpret_cast<const c10::Float8_e4m3fn*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = float(p[i]) * scale;
      return;
    }
    case Storage::E5M2: {
      const auto* p = reinterpret_cast<const c10::Float8_e5m2*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = float(p[i]) * scale;
      return;
    }
  }
}

int popcount32(uint32_t x) { return __builtin_popcount(x); }

// ---------------------------------------------------------------------------------------------
// Rebuilding one slot-head into a float row
// ---------------------------------------------------------------------------------------------

// A compressed (keys or values) or dense tensor of one layer, as the kernels read it.
struct Compact {
  Part kept, mask, sign, fill;
  Storage storage = Storage::F32;
  float scale = 1.0f;   // FP8 k_scale / v_scale
  float out_max = 0.f;  // the dtype's finite range: recovered entries are clamped to it
  int64_t dim = 0;      // D
  // fp16 / bf16 caches rebuild entries in their own dtype (reference.output_dtype): recovered
  // entries are rounded to it, as the reference's dense rebuild and the Triton tiles are.
  bool round_f16 = false, round_bf16 = false;
  bool compressed() const { return mask.present(); }
};

// Sign bits of one slot-head as a zero-padded byte string long enough for any 64-bit read at a
// pruned rank below D (a corrupt bitmap can have up to D pruned channels; bits past P read 0).
struct SignBits {
  uint8_t bytes[kMaxHeadDim / 8 + 8];
  void load(const uint8_t* src, int64_t words) {
    std::memset(bytes, 0, sizeof(bytes));
    if (src) std::memcpy(bytes, src, words * 4);
  }
  bool bit(int i) const { return (bytes[i >> 3] >> (i & 7)) & 1; }
  uint64_t from(int i) const {  // bits i, i+1, ... in the low bits
    uint64_t x;
    std::memcpy(&x, bytes + (i >> 3), 8);
    return x >> (i & 7);
  }
};

// Scratch of one task: the kept entries as float, the sign bits.
struct Scratch {
  alignas(64) float kept[kMaxHeadDim];
  SignBits signs;
};

// The bitmap words of a slot-head, or all zero (all pruned) if more bits are set than there are
// kept entries: no rank may then reach past the record (decode._bitmaps does the same).
int load_bitmap(const Compact& c, int64_t slot, int64_t head, uint32_t* words) {
  const int nwords = int(c.dim / 32);
  std::memcpy(words, c.mask.at(slot, head), nwords * 4);
  int set = 0;
  for (int w = 0; w < nwords; ++w) set += popcount32(words[w]);
  if (set > c.kept.count) {
    std::memset(words, 0, nwords * 4);
    set = 0;
  }
  return set;
}

// The bitmap words and the kept entries (as float) of a compressed slot-head.
const float* load_kept(const Compact& c, int64_t slot, int64_t head, Scratch& s, uint32_t* words) {
  const int set = load_bitmap(c, slot, head, words);
  if (c.storage == Storage::F32) return reinterpret_cast<const float*>(c.kept.at(slot, head));
  load_entries(c.kept.at(slot, head), set, c.storage, c.scale, s.kept);
  return s.kept;
}

float fill_of(const Compact& c, int64_t slot, int64_t head) {
  uint16_t bits;
  std::memcpy(&bits, c.fill.at(slot, head), 2);
  return bf16_to_float(bits);
}

float clamp_magnitude(float m, float limit) { return std::isnan(m) ? m : std::min(m, limit); }

float round_entry(const Compact& c, float x) {
  if (c.round_f16) return float(c10::Half(x));
  if (c.round_bf16) return float(c10::BFloat16(x));
  return x;
}

#if SPARK_AVX512
__m512 round_entries(const Compact& c, __m512 x) {
  if (c.round_f16) return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (c.round_bf16) {  // round to nearest even on the upper 16 bits; NaN stays NaN
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                                             _mm512_set1_epi32(int32_t(0xFFFF0000u)));
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(rounded), _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
  }
  return x;
}
#endif

// Key of (slot, head) into ``row[D]``: kept entries at their channels, pruned channels recovered
// as ``sign * min(fill * rs[c], max)`` ("mean", ``rs = Qn^-1/2`` of the slot's window row) or 0.
void rebuild_key(const Compact& c, int64_t slot, int64_t head, const float* rs, Scratch& s, float* row) {
  const int64_t d = c.dim;
  if (!c.compressed()) {
    load_entries(c.kept.at(slot, head), d, c.storage, c.scale, row);
    return;
  }
  uint32_t words[kMaxHeadDim / 32];
  const float* kept = load_kept(c, slot, head, s, words);
  const bool mean = c.fill.present();  // "mean" recovery (a key ratio of 0 stores no sign words)
  const float fill = mean ? fill_of(c, slot, head) : 0.f;
  if (mean) s.signs.load(c.sign.present() ? c.sign.at(slot, head) : nullptr, c.sign.count);
#if SPARK_AVX512
  const __m512 fill_v = _mm512_set1_ps(fill), limit = _mm512_set1_ps(c.out_max), zero = _mm512_setzero_ps();
  int rank = 0, pruned_rank = 0;
  for (int64_t j = 0; j < d / 16; ++j) {
    const __mmask16 keep = __mmask16(words[j >> 1] >> (16 * (j & 1)));
    __m512 x = _mm512_maskz_expandloadu_ps(keep, kept + rank);
    rank += popcount32(keep);
    if (mean) {
      const __mmask16 pruned = __mmask16(~keep);
      const __mmask16 negative = __mmask16(_pdep_u32(uint32_t(s.signs.from(pruned_rank)), pruned));
      pruned_rank += popcount32(pruned);
      // min(x, limit) with NaN kept: _mm512_min_ps returns its second operand when either is NaN.
      const __m512 magnitude =
          round_entries(c, _mm512_min_ps(limit, _mm512_mul_ps(fill_v, _mm512_loadu_ps(rs + 16 * j))));
      x = _mm512_mask_mov_ps(x, pruned & ~negative, magnitude);
      x = _mm512_mask_sub_ps(x, negative, zero, magnitude);
    }
    _mm512_storeu_ps(row + 16 * j, x);
  }
#else
  int rank = 0, pruned_rank = 0;
  for (int64_t ch = 0; ch < d; ++ch) {
    if ((words[ch >> 5] >> (ch & 31)) & 1) {
      row[ch] = kept[rank++];
    } else if (mean) {
      const float magnitude = round_entry(c, clamp_magnitude(fill * rs[ch], c.out_max));
      row[ch] = s.signs.bit(pruned_rank++) ? -magnitude : magnitude;
    } else {
      row[ch] = 0.f;
    }
  }
#endif
}

// Value of (slot, head) into ``row[D]``: kept entries at their channels, the fill elsewhere.
void rebuild_value(const Compact& c, int64_t slot, int64_t head, Scratch& s, float* row) {
  const int64_t d = c.dim;
  if (!c.compressed()) {
    load_entries(c.kept.at(slot, head), d, c.storage, c.scale, row);
    return;
  }
  uint32_t words[kMaxHeadDim / 32];
  const float* kept = load_kept(c, slot, head, s, words);
  const float fill = round_entry(c, std::clamp(fill_of(c, slot, head), -c.out_max, c.out_max));
#if SPARK_AVX512
  const __m512 fill_v = _mm512_set1_ps(fill);
  int rank = 0;
  for (int64_t j = 0; j < d / 16; ++j) {
    const __mmask16 keep = __mmask16(words[j >> 1] >> (16 * (j & 1)));
    _mm512_storeu_ps(row + 16 * j, _mm512_mask_expandloadu_ps(fill_v, keep, kept + rank));
    rank += popcount32(keep);
  }
#else
  int rank = 0;
  for (int64_t ch = 0; ch < d; ++ch) row[ch] = ((words[ch >> 5] >> (ch & 31)) & 1) ? kept[rank++] : fill;
#endif
}

// ``Qn^-1/2`` of one window row and head, 0 where ``Qn`` is below the smallest normal float or
// NaN (reference.rsqrt_or_zero).
struct RowRsqrt {
  const uint8_t* stats = nullptr;  // [rows, stats, H, D] bfloat16, the key norm at stats index 0
  int64_t row_stride = 0, head_stride = 0, rows = 0, dim = 0;
  void compute(int64_t row, int64_t head, float* out) const {
    const auto* qn = reinterpret_cast<const uint16_t*>(stats + row * row_stride + head * head_stride);
    for (int64_t c = 0; c < dim; ++c) {
      const float n = bf16_to_float(qn[c]);
      out[c] = n >= kMinNormal ? 1.0f / std::sqrt(n) : 0.0f;
    }
  }
};

Compact compact_of(const at::Tensor& kept, const at::Tensor& mask, const at::Tensor& sign, const at::Tensor& fill,
                   int64_t slots, int64_t dim, double scale, double out_max, bool is_value) {
  Compact c;
  c.kept = part_of(kept, slots);
  c.mask = part_of(mask, slots);
  c.sign = part_of(sign, slots);
  c.fill = part_of(fill, slots);
  c.storage = storage_of(kept.scalar_type());
  c.scale = float(scale);
  c.out_max = float(out_max);
  c.dim = dim;
  c.round_f16 = kept.scalar_type() == at::kHalf;
  c.round_bf16 = kept.scalar_type() == at::kBFloat16;
  TORCH_CHECK(dim % 32 == 0 && dim <= kMaxHeadDim, "head dim ", dim, " is not a multiple of 32 up to ", kMaxHeadDim);
  if (c.compressed()) {
    TORCH_CHECK(c.mask.count == dim / 32, "bitmap has ", c.mask.count, " words, head dim ", dim, " needs ", dim / 32);
    TORCH_CHECK(c.kept.count <= dim, "more kept entries (", c.kept.count, ") than channels (", dim, ")");
    TORCH_CHECK(!is_value || c.fill.present(), "compressed values without their fill");
    TORCH_CHECK(!c.sign.present() || c.sign.count * 32 <= dim, "too many sign words");
  } else {
    TORCH_CHECK(c.kept.count == dim, "dense entries have ", c.kept.count, " channels, expected ", dim);
  }
  return c;
}

RowRsqrt row_rsqrt_of(const at::Tensor& window_stats, int64_t heads, int64_t dim) {
  RowRsqrt r;
  if (!window_stats.defined() || window_stats.numel() == 0) return r;
  TORCH_CHECK(window_stats.scalar_type() == at::kBFloat16 && window_stats.dim() == 4 &&
                  window_stats.size(2) == heads && window_stats.size(3) == dim && window_stats.stride(3) == 1,
              "window_stats must be [rows, stats, H, D] bfloat16 with contiguous channels");
  r.stats = static_cast<const uint8_t*>(window_stats.data_ptr());
  r.row_stride = window_stats.stride(0) * 2;
  r.head_stride = window_stats.stride(2) * 2;
  r.rows = window_stats.size(0);
  r.dim = dim;
  return r;
}

// Every slot in range, and (when pruned keys are recovered) every slot's window row in the table:
// checked once before any task runs, so no task reads out of bounds.
void check_slots(const int64_t* slots, int64_t n, int64_t num_slots, const int32_t* slot_rows, int64_t rows,
                 bool need_rows) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(slots[i] >= 0 && slots[i] < num_slots, "KV slot index ", slots[i], " is outside the pool's ",
                num_slots, " slots");
    if (need_rows) {
      const int32_t r = slot_rows[slots[i]];
      TORCH_CHECK(r >= 0 && r < rows, "slot ", slots[i], " has window row ", r, ", outside the table's ", rows,
                  " rows (corrupt metadata)");
    }
  }
}

float soft_cap(float x, float cap) { return cap > 0 ? cap * std::tanh(x / cap) : x; }

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

// Decode: out [B, Hq, Dv] float32 and lse [B, Hq] float32 of one query per request over the slots
// ``indices[indptr[b]:indptr[b+1]]``.
void decode(const at::Tensor& q, const at::Tensor& indptr, const at::Tensor& indices,
            const at::Tensor& k_kept, const at::Tensor& k_mask, const at::Tensor& k_sign, const at::Tensor& k_fill,
            const at::Tensor& v_kept, const at::Tensor& v_mask, const at::Tensor& v_fill,
            const at::Tensor& window_stats, const at::Tensor& slot_rows, double sm_scale, double logit_cap,
            double k_scale, double v_scale, double out_max, int64_t split_tokens, at::Tensor& out,
            at::Tensor& lse) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3, "q must be contiguous float32 [B, Hq, D]");
  TORCH_CHECK(indptr.scalar_type() == at::kLong && indices.scalar_type() == at::kLong, "indptr/indices must be int64");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && lse.scalar_type() == at::kFloat &&
                  lse.is_contiguous(), "out / lse must be contiguous float32");
  TORCH_CHECK(split_tokens > 0, "split_tokens must be positive");
  const int64_t batch = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t slots = k_kept.size(0), hkv = k_kept.size(1);
  TORCH_CHECK(hq % hkv == 0, hq, " query heads are not a multiple of ", hkv, " KV heads");
  const int64_t group = hq / hkv;
  TORCH_CHECK(v_kept.size(0) == slots && v_kept.size(1) == hkv, "values disagree with keys on slots / heads");
  const int64_t dv = v_mask.defined() && v_mask.numel() ? v_mask.size(2) * 32 : v_kept.size(2);
  TORCH_CHECK(out.size(0) == batch && out.size(1) == hq && out.size(2) == dv && lse.size(0) == batch &&
              lse.size(1) == hq, "out / lse shapes do not match q");
  TORCH_CHECK(indptr.numel() == batch + 1, "indptr has ", indptr.numel(), " entries for ", batch, " requests");
  const Compact keys = compact_of(k_kept, k_mask, k_sign, k_fill, slots, d, k_scale, out_max, false);
  const Compact values = compact_of(v_kept, v_mask, at::Tensor(), v_fill, slots, dv, v_scale, out_max, true);
  const RowRsqrt rsqrt = row_rsqrt_of(window_stats, hkv, d);
  const bool need_rows = keys.compressed() && keys.fill.present();
  TORCH_CHECK(!need_rows || (rsqrt.stats && slot_rows.scalar_type() == at::kInt && slot_rows.numel() >= slots),
              "mean recovery needs window_stats and int32 slot_rows");

  const int64_t* ptr = indptr.data_ptr<int64_t>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int32_t* rows = need_rows ? slot_rows.data_ptr<int32_t>() : nullptr;
  for (int64_t b = 0; b < batch; ++b) TORCH_CHECK(ptr[b] <= ptr[b + 1], "indptr is not non-decreasing");
  TORCH_CHECK(ptr[0] >= 0 && ptr[batch] <= indices.numel(), "indptr reaches past indices");
  check_slots(idx + ptr[0], ptr[batch] - ptr[0], slots, rows, rsqrt.rows, need_rows);

  // Tasks: (request, KV head, split). Partial outputs [task, G, Dv] and LSEs [task, G].
  std::vector<int64_t> first_task(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = ptr[b + 1] - ptr[b];
    first_task[b + 1] = first_task[b] + hkv * std::max<int64_t>(1, (n + split_tokens - 1) / split_tokens);
  }
  const int64_t tasks = first_task[batch];
  std::vector<float> part_out(tasks * group * dv), part_lse(tasks * group);
  const float* qp = q.data_ptr<float>();
  const float scale = float(sm_scale), cap = float(logit_cap);

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    alignas(64) float rs[kMaxHeadDim], row[kMaxHeadDim];
    std::vector<float> logits, acc(group * dv);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const int64_t local = task - first_task[b];
      const int64_t splits = (first_task[b + 1] - first_task[b]) / hkv;
      const int64_t head = local / splits, split = local % splits;
      const int64_t lo = ptr[b] + split * split_tokens, hi = std::min(ptr[b + 1], lo + split_tokens);
      float* o = part_out.data() + task * group * dv;
      float* l = part_lse.data() + task * group;
      if (lo >= hi) {
        std::fill(o, o + group * dv, 0.f);
        std::fill(l, l + group, -std::numeric_limits<float>::infinity());
        continue;
      }
      const int64_t n = hi - lo;
      const float* qh = qp + (b * hq + head * group) * d;
      logits.resize(n * group);
      int64_t current_row = -1;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t slot = idx[lo + t];
        if (need_rows && rows[slot] != current_row) {
          current_row = rows[slot];
          rsqrt.compute(current_row, head, rs);
        }
        rebuild_key(keys, slot, head, rs, scratch, row);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qh + g * d;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < d; ++c) dot += qg[c] * row[c];
          logits[g * n + t] = soft_cap(dot * scale, cap);
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::vector<float> peak(group), total(group, 0.f);
      for (int64_t g = 0; g < group; ++g) {
        float* lg = logits.data() + g * n;
        peak[g] = *std::max_element(lg, lg + n);
        const float m = std::isinf(peak[g]) && peak[g] < 0 ? 0.f : peak[g];
        for (int64_t t = 0; t < n; ++t) {
          lg[t] = std::exp(lg[t] - m);
          total[g] += lg[t];
        }
        peak[g] = m;
      }
      for (int64_t t = 0; t < n; ++t) {
        rebuild_value(values, idx[lo + t], head, scratch, row);
        for (int64_t g = 0; g < group; ++g) {
          const float p = logits[g * n + t];
          float* a = acc.data() + g * dv;
#pragma omp simd
          for (int64_t c = 0; c < dv; ++c) a[c] += p * row[c];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.0f / total[g];
        for (int64_t c = 0; c < dv; ++c) o[g * dv + c] = acc[g * dv + c] * inv;
        l[g] = peak[g] + std::log(total[g]);
      }
    }
  });

  // Merge each request's splits by log-sum-exp (in split order: the result is the same for any
  // number of threads).
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, batch * hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / hkv, head = bh % hkv;
      const int64_t splits = (first_task[b + 1] - first_task[b]) / hkv;
      const int64_t task0 = first_task[b] + head * splits;
      for (int64_t g = 0; g < group; ++g) {
        float* o = op + (b * hq + head * group + g) * dv;
        float peak = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < splits; ++s) peak = std::max(peak, part_lse[(task0 + s) * group + g]);
        if (ptr[b + 1] == ptr[b] || (std::isinf(peak) && peak < 0)) {
          std::fill(o, o + dv, 0.f);
          lp[b * hq + head * group + g] = ptr[b + 1] == ptr[b] ? -std::numeric_limits<float>::infinity() : peak;
          continue;
        }
        std::fill(o, o + dv, 0.f);
        float total = 0.f;
        for (int64_t s = 0; s < splits; ++s) {
          const float w = std::exp(part_lse[(task0 + s) * group + g] - peak);
          total += w;
          const float* po = part_out.data() + ((task0 + s) * group + g) * dv;
          for (int64_t c = 0; c < dv; ++c) o[c] += w * po[c];
        }
        for (int64_t c = 0; c < dv; ++c) o[c] /= total;
        lp[b * hq + head * group + g] = peak + std::log(total);
      }
    }
  });
}

// Unpack: dense float32 keys and values ``[Hkv, n, D]`` of ``slots`` (the extend's cached prefix,
// which its queries read through PyTorch's flash attention), as the decode rebuilds them.
std::vector<at::Tensor> unpack(const at::Tensor& slots_t, const at::Tensor& k_kept, const at::Tensor& k_mask,
                               const at::Tensor& k_sign, const at::Tensor& k_fill, const at::Tensor& v_kept,
                               const at::Tensor& v_mask, const at::Tensor& v_fill, const at::Tensor& window_stats,
                               const at::Tensor& slot_rows, int64_t dim, double k_scale, double v_scale,
                               double out_max) {
  TORCH_CHECK(slots_t.scalar_type() == at::kLong && slots_t.is_contiguous(), "slots must be contiguous int64");
  const int64_t n = slots_t.numel(), num_slots = k_kept.size(0), hkv = k_kept.size(1);
  const Compact keys = compact_of(k_kept, k_mask, k_sign, k_fill, num_slots, dim, k_scale, out_max, false);
  const int64_t dv = v_mask.defined() && v_mask.numel() ? v_mask.size(2) * 32 : v_kept.size(2);
  const Compact values = compact_of(v_kept, v_mask, at::Tensor(), v_fill, num_slots, dv, v_scale, out_max, true);
  const RowRsqrt rsqrt = row_rsqrt_of(window_stats, hkv, dim);
  const bool need_rows = keys.compressed() && keys.fill.present();
  TORCH_CHECK(!need_rows || (rsqrt.stats && slot_rows.scalar_type() == at::kInt && slot_rows.numel() >= num_slots),
              "mean recovery needs window_stats and int32 slot_rows");
  const int64_t* slots = slots_t.data_ptr<int64_t>();
  const int32_t* rows = need_rows ? slot_rows.data_ptr<int32_t>() : nullptr;
  check_slots(slots, n, num_slots, rows, rsqrt.rows, need_rows);
  auto k = at::empty({hkv, n, dim}, at::kFloat), v = at::empty({hkv, n, dv}, at::kFloat);
  float* kp = k.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    alignas(64) float rs[kMaxHeadDim];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / chunks, lo = (task % chunks) * kChunk, hi = std::min(n, lo + kChunk);
      int64_t current_row = -1;
      for (int64_t t = lo; t < hi; ++t) {
        if (need_rows && rows[slots[t]] != current_row) {
          current_row = rows[slots[t]];
          rsqrt.compute(current_row, head, rs);
        }
        rebuild_key(keys, slots[t], head, rs, scratch, kp + (head * n + t) * dim);
        rebuild_value(values, slots[t], head, scratch, vp + (head * n + t) * dv);
      }
    }
  });
  return {k, v};
}

bool native_simd() { return SPARK_AVX512; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "SparK decode attention over compact records (CPU)");
  m.def("unpack", &unpack, "dense float32 keys/values [Hkv, n, D] of slots (CPU)");
  m.def("native_simd", &native_simd, "whether this build uses AVX-512 expand-loads");
}
