// The KV cache: per layer, per (local) KV head, a variable-length list of kept tokens with their
// keys, values and absolute positions. Heads are independent so that compression policies can
// keep different tokens per head; attention masks by position, not by index.
//
// An entry is held in one of six forms: full precision, int8 codes, KIVI codes (2/4 bits),
// low-rank coordinates, or per-token 4-/2-bit codes (the tiered policy's lower rungs; KIVI can be
// its lowest). Each form has its own packed store per head; attention asks for a head's
// rows (`rows`), which are the stores themselves while every entry is full precision and are
// otherwise dequantized / reconstructed into a scratch the caller owns.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kv/lowrank.h"

namespace kvtp::kv {

// Token4 / Token2: keys and values each quantized on their own, asymmetric over groups of
// kTokenGroup channels (a (lo, step) pair per group): entries need no neighbours, so any entry can
// be demoted alone (KIVI's keys share per-channel pairs over a run of consecutive entries).
enum class Form : uint8_t { Full, Int8, Kivi, LowRank, Token4, Token2 };
constexpr int kForms = 6;
constexpr int kTokenGroup = 32;
inline int tokenBits(Form f) { return f == Form::Token4 ? 4 : 2; }

// Asymmetric `bits`-bit quantization of values: x ~ lo + code * step with codes in
// [0, 2^bits - 1]; fitted to the min and max, so the error is at most step / 2.
struct Affine {
  float lo = 0, step = 0;
  float decode(int code) const { return lo + float(code) * step; }
};
Affine fitAffine(const float* x, int n, int stride, int bits);
int encodeAffine(float x, Affine a, int bits);
// Symmetric int8: x ~ code * step with step = max|x| / 127, error at most step / 2.
float fitInt8(const float* x, int n);
int encodeInt8(float x, float step);

struct HeadCache {
  // Per entry, in position order; score/history/... are kept in step by every change.
  std::vector<int32_t> positions;  // the token's absolute position
  std::vector<double> score;       // the eviction policy's importance score (kv::Policy)
  std::vector<uint64_t> history;   // Scissorhands: one bit per recent step, 1 = attended above average
  std::vector<float> out_norm;     // CriticalKV: ||W_o v||_1 over the query heads reading it (kv::Policy sets it)
  std::vector<Form> form;          // how the entry is stored
  // The stores, one row per entry of that form, rows in entry order.
  std::vector<float> keys, values;   // Full: head_dim each
  std::vector<uint8_t> codes;        // Int8 / Kivi: key codes then value codes, bit-packed
  std::vector<float> row_params;     // Int8: key step, value step; Kivi: value (lo, step) per channel group
  std::vector<float> key_params;     // Kivi: per key group, (lo, step) per channel
  std::vector<uint16_t> group_rows;  // Kivi: rows left in each key group (eviction thins groups)
  std::vector<int32_t> kivi_group;   // Kivi: per row, its key group (a group's rows need not be neighbours)
  std::vector<float> coords;         // LowRank: rank key then rank value coordinates
  std::vector<uint8_t> token_codes[2];   // Token4, Token2: key codes then value codes, bit-packed
  std::vector<float> token_params[2];    // Token4, Token2: (lo, step) per channel group, key then value
  int length() const { return int(positions.size()); }
};

// What a store's entries measure: the bytes of `entries` entries of `form` as a GPU stores them —
// 2 per float (fp16), codes as packed — with KIVI's `runs` key groups (a (lo, step) per channel
// and a 2-byte row count each). Full 4 head_dim; int8 2 head_dim + 4; KIVI 2 code bytes + 4 per
// value group, 4 head_dim + 2 per run; low rank 4 rank; Token4/2 2 code bytes + 8 per channel group.
struct StoreShape {
  int head_dim;
  int code_bits = 0, value_group = 0;  // KIVI: bits and group
  int rank = 0;                        // low rank
  int64_t bytes(Form form, int64_t entries, int64_t runs = 0) const;
};

// A head's keys and values as full-precision (length, head_dim) rows.
struct HeadRows {
  const float* keys;
  const float* values;
};

class KVCache {
 public:
  // rows_on_device: a host mirror of a device cache (the CUDA engine's): positions, scores and
  // forms only, so that kv::Policy decides for it; the rows live on the GPU (full, int8 or KIVI).
  KVCache(int layers, int kv_heads, int head_dim, bool rows_on_device = false);
  bool rowsOnDevice() const { return rows_on_device_; }

  // Appends T tokens to every head of `layer` at full precision; k and v are (T, kv_heads * head_dim).
  void append(int layer, const float* k, const float* v, const int* positions, int T);
  // Keeps only entries `keep` (ascending indices into the head's current list).
  void retain(int layer, int head, const std::vector<int>& keep);
  void clear();

  // The cache's one quantization (int8: bits 8; KIVI: its bits and value group), fixed by its
  // first use; the conversions below set it, and a policy that converts heads in parallel sets it
  // first.
  void useCodes(int bits, int value_group = 0);
  // Storage conversions of full-precision entries (others are left as they are).
  // Int8: every full entry, keys and values per token.
  void quantizeInt8(int layer, int head);
  // KIVI: each run (ascending entry indices, none KIVI or low rank already) becomes one key group:
  // keys per channel over the run's entries, values per token over groups of `group` channels.
  void quantizeKivi(int layer, int head, const std::vector<std::vector<int>>& runs, int bits, int group);
  // Low rank: full and int8 entries before index `end` become their coordinates in the head's
  // bases (int8's decoded); KIVI's stay in their runs.
  void setLowRank(LowRankBases bases) { lowrank_ = std::move(bases); }
  // The model's RoPE frequencies (empty: no RoPE), for scores that read keys before rotation.
  void setRope(std::vector<float> inv_freq) { rope_inv_freq_ = std::move(inv_freq); }
  const std::vector<float>& ropeInvFreq() const { return rope_inv_freq_; }
  void toLowRank(int layer, int head, int end);
  // The tiered policy: keeps entries `keep` (ascending), each demoted to `to[k]` (Full, Int8,
  // Token4 or Token2) where that is a lower rung than its form (Full > Int8 > Token4 > Kivi >
  // Token2; an entry is never promoted: what a demotion dropped is gone). A KIVI entry stays KIVI
  // (quantizeKivi makes them, a run at a time).
  void demote(int layer, int head, const std::vector<int>& keep, const std::vector<Form>& to);
  // Whether an entry held as `form` can be held as `rung` of the ladder (no form moves up).
  static bool canHold(Form form, Form rung);

  // Full-precision rows of every entry, in entry order; `scratch` holds them unless the head has
  // only full entries (then they are the store itself). A mirror's: those holdRows gave it.
  HeadRows rows(int layer, int head, std::vector<float>& scratch) const;
  // Entries `entries` (ascending indices) of a head at full precision, as rows() gives them:
  // (entries.size(), head_dim) floats into k and v.
  void decodeEntries(int layer, int head, const std::vector<int>& entries, float* k, float* v) const;
  // A mirror's rows for a decision that reads them (the methods its device does not score): the
  // head's keys and values as the device decodes them, length x head_dim floats each, what rows()
  // gives until the head next changes (an append or a retain lets them go).
  void holdRows(int layer, int head, const float* keys, const float* values);
  // Bytes as a GPU stores this head (StoreShape::bytes over its entries).
  int64_t storedBytes(int layer, int head) const;

  const HeadCache& head(int layer, int h) const { return heads_[size_t(layer) * kv_heads_ + h]; }
  // For the policy's per-entry score and history; the stores change only through the methods above.
  HeadCache& head(int layer, int h) { return heads_[size_t(layer) * kv_heads_ + h]; }
  int layers() const { return layers_; }
  int kvHeads() const { return kv_heads_; }
  int headDim() const { return head_dim_; }

 private:
  struct Conversion;
  void rebuild(int layer, int head, const std::vector<int>& keep, const Conversion& convert);
  // Entry i (the `row`-th of its form) at full precision into k, v.
  void decodeEntry(const HeadCache& c, int layer, int head, int i, int row, float* k, float* v) const;
  int codeBytes() const { return (head_dim_ * code_bits_ + 7) / 8; }  // one key's or value's codes
  // Parameters per packed row: int8 a step for the key and one for the value; KIVI the value's
  // (lo, step) per channel group.
  int rowParams() const {
    return code_bits_ == 8 ? 2 : value_group_ ? 2 * ((head_dim_ + value_group_ - 1) / value_group_) : 0;
  }

  int layers_, kv_heads_, head_dim_;
  bool rows_on_device_;
  int code_bits_ = 0;   // 8 (int8) or KIVI's 2 / 4, fixed by the first quantization
  int value_group_ = 0; // KIVI: entries per key group and channels per value group
  LowRankBases lowrank_;
  std::vector<float> rope_inv_freq_;
  std::vector<HeadCache> heads_;
};

}  // namespace kvtp::kv
