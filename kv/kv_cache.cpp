#include "kv/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

#include "kernels/cpu_ops.h"

namespace kvtp::kv {

Affine fitAffine(const float* x, int n, int stride, int bits) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, x[int64_t(i) * stride]);
    hi = std::max(hi, x[int64_t(i) * stride]);
  }
  return {lo, (hi - lo) / float((1 << bits) - 1)};
}

int encodeAffine(float x, Affine a, int bits) {
  if (a.step <= 0) return 0;  // all values equal lo
  return int(std::clamp(std::nearbyint((x - a.lo) / a.step), 0.0f, float((1 << bits) - 1)));
}

float fitInt8(const float* x, int n) {
  float mx = 0;
  for (int i = 0; i < n; ++i) mx = std::max(mx, std::abs(x[i]));
  return mx / 127.0f;
}

int encodeInt8(float x, float step) {
  if (step <= 0) return 0;
  return int(std::clamp(std::nearbyint(x / step), -127.0f, 127.0f));
}

namespace {

// n codes of `bits` bits (2, 4 or 8: a code never straddles a byte), low bits first.
void pack(const int* q, int n, int bits, uint8_t* out) {
  std::fill_n(out, (n * bits + 7) / 8, uint8_t(0));
  for (int i = 0; i < n; ++i) out[i * bits / 8] |= uint8_t((q[i] & ((1 << bits) - 1)) << (i * bits % 8));
}

int unpack(const uint8_t* packed, int i, int bits) { return (packed[i * bits / 8] >> (i * bits % 8)) & ((1 << bits) - 1); }

std::vector<int> everyIndex(int n) {
  std::vector<int> all(static_cast<size_t>(n));
  std::iota(all.begin(), all.end(), 0);
  return all;
}

template <typename V>
void appendRow(std::vector<V>& to, const std::vector<V>& from, int64_t row, int64_t width) {
  to.insert(to.end(), from.begin() + row * width, from.begin() + (row + 1) * width);
}

}  // namespace

// Which entries a rebuild converts, and to what.
struct KVCache::Conversion {
  Form to = Form::Full;            // Full: none
  std::vector<uint8_t> convert;    // per entry: 1 = convert it
  std::vector<std::vector<int>> runs;  // Kivi: the entries of each new key group
  std::vector<int> run_of;             // Kivi: per entry, its index in `runs` (-1: none)
  std::vector<Form> each;          // demote: per entry, its own target (then `to` is unused)
};

namespace {

int tokenIndex(Form f) { return f == Form::Token4 ? 0 : 1; }
int tokenCodeBytes(int head_dim, Form f) { return (head_dim * tokenBits(f) + 7) / 8; }
int tokenGroups(int head_dim) { return (head_dim + kTokenGroup - 1) / kTokenGroup; }

// A rung of the tiered ladder: higher holds more.
int rung(Form f) {
  switch (f) {
    case Form::Full: return 4;
    case Form::Int8: return 3;
    case Form::Token4: return 2;
    case Form::Kivi: return 1;
    default: return 0;  // Token2 (low rank is not on the ladder)
  }
}

}  // namespace

KVCache::KVCache(int layers, int kv_heads, int head_dim, bool rows_on_device)
    : layers_(layers), kv_heads_(kv_heads), head_dim_(head_dim), rows_on_device_(rows_on_device),
      heads_(size_t(layers) * kv_heads) {}

void KVCache::append(int layer, const float* k, const float* v, const int* positions, int T) {
  const int row = kv_heads_ * head_dim_;
  for (int h = 0; h < kv_heads_; ++h) {
    HeadCache& c = this->head(layer, h);
    for (int t = 0; t < T; ++t) {
      const float* kr = rows_on_device_ ? nullptr : k + int64_t(t) * row + h * head_dim_;
      const float* vr = rows_on_device_ ? nullptr : v + int64_t(t) * row + h * head_dim_;
      if (!rows_on_device_) {
        c.keys.insert(c.keys.end(), kr, kr + head_dim_);
        c.values.insert(c.values.end(), vr, vr + head_dim_);
      }
      if (rows_on_device_) c.keys.clear(), c.values.clear();  // held rows (holdRows) no longer match
      c.positions.push_back(positions[t]);
      c.score.push_back(0.0);
      c.history.push_back(0);
      c.out_norm.push_back(0.0f);
      c.form.push_back(Form::Full);
    }
  }
}

void KVCache::retain(int layer, int head, const std::vector<int>& keep) {
  if (!rows_on_device_) return rebuild(layer, head, keep, {});
  // A mirror holds no rows: its per-entry fields compacted in place (a decode step retains in
  // every head of the model).
  HeadCache& c = this->head(layer, head);
  int prev = -1;
  size_t j = 0;
  for (int i : keep) {
    if (i <= prev || i >= c.length()) throw std::out_of_range("KVCache::retain: indices must ascend within the head");
    prev = i;
    c.positions[j] = c.positions[i], c.score[j] = c.score[i], c.history[j] = c.history[i], c.form[j] = c.form[i];
    c.out_norm[j] = c.out_norm[i];
    ++j;
  }
  c.positions.resize(j), c.score.resize(j), c.history.resize(j), c.form.resize(j), c.out_norm.resize(j);
  c.keys.clear(), c.values.clear();  // held rows (holdRows) no longer match
}

void KVCache::holdRows(int layer, int head, const float* keys, const float* values) {
  if (!rows_on_device_) throw std::logic_error("KVCache::holdRows: a host cache holds its own rows");
  HeadCache& c = this->head(layer, head);
  const size_t n = size_t(c.length()) * head_dim_;
  c.keys.assign(keys, keys + n), c.values.assign(values, values + n);
}

void KVCache::clear() {
  for (auto& c : heads_) c = HeadCache{};
}

void KVCache::useCodes(int bits, int value_group) {
  if (code_bits_ == bits && value_group_ == value_group) return;  // (heads quantize in parallel: no write)
  if (rows_on_device_) throw std::logic_error("KVCache: a device cache's mirror cannot quantize");
  if (code_bits_) throw std::logic_error("KVCache: one quantization per cache");
  code_bits_ = bits, value_group_ = value_group;
}

void KVCache::quantizeInt8(int layer, int head) {
  if (rows_on_device_) {
    // The device stores its rows in int8 from the start: the mirror records the form. Every step
    // quantizes what it appended, so the full entries are the newest (a walk from the end: a
    // decode step at 32k context spent ~10 ms walking all of them).
    auto& form = this->head(layer, head).form;
    for (auto f = form.rbegin(); f != form.rend() && *f == Form::Full; ++f) *f = Form::Int8;
    return;
  }
  useCodes(8);
  Conversion cv;
  cv.to = Form::Int8;
  for (Form f : this->head(layer, head).form) cv.convert.push_back(f == Form::Full);
  rebuild(layer, head, everyIndex(this->head(layer, head).length()), cv);
}

void KVCache::quantizeKivi(int layer, int head, const std::vector<std::vector<int>>& runs, int bits, int group) {
  useCodes(bits, group);
  if (runs.empty()) return;
  const HeadCache& c = this->head(layer, head);
  Conversion cv;
  cv.to = Form::Kivi;
  cv.convert.assign(size_t(c.length()), 0);
  cv.run_of.assign(size_t(c.length()), -1);
  cv.runs = runs;
  for (size_t r = 0; r < runs.size(); ++r)
    for (size_t k = 0; k < runs[r].size(); ++k) {
      const int i = runs[r][k];
      if (i < 0 || i >= c.length() || (k && i <= runs[r][k - 1]))
        throw std::out_of_range("KVCache::quantizeKivi: a run's entries ascend within the head");
      if (cv.run_of[i] >= 0 || c.form[i] == Form::Kivi || c.form[i] == Form::LowRank)
        throw std::logic_error("KVCache::quantizeKivi: an entry joins one run, and is not KIVI or low rank already");
      cv.run_of[i] = int(r), cv.convert[i] = 1;
    }
  rebuild(layer, head, everyIndex(c.length()), cv);
}

void KVCache::toLowRank(int layer, int head, int end) {
  if (rows_on_device_) throw std::logic_error("KVCache: a device cache's mirror cannot hold low-rank entries");
  if (int(lowrank_.keys.size()) != layers_ * kv_heads_) throw std::logic_error("KVCache: low rank asked for but no bases were set");
  const HeadCache& c = this->head(layer, head);
  Conversion cv;
  cv.to = Form::LowRank;
  for (int i = 0; i < c.length(); ++i)
    cv.convert.push_back(i < end && (c.form[i] == Form::Full || c.form[i] == Form::Int8));
  if (std::find(cv.convert.begin(), cv.convert.end(), 1) == cv.convert.end()) return;
  rebuild(layer, head, everyIndex(c.length()), cv);
}

bool KVCache::canHold(Form form, Form rung_form) { return rung(rung_form) <= rung(form); }

void KVCache::demote(int layer, int head, const std::vector<int>& keep, const std::vector<Form>& to) {
  if (rows_on_device_) throw std::logic_error("KVCache: a device cache's mirror cannot demote");
  if (keep.size() != to.size()) throw std::invalid_argument("KVCache::demote: a form per kept entry");
  const HeadCache& c = this->head(layer, head);
  Conversion cv;
  cv.convert.assign(size_t(c.length()), 0);
  cv.each.assign(size_t(c.length()), Form::Full);
  for (size_t k = 0; k < keep.size(); ++k) {
    const int i = keep[k];
    if (i < 0 || i >= c.length()) throw std::out_of_range("KVCache::demote: no such entry");
    if (to[k] == Form::LowRank || (to[k] == Form::Kivi) != (c.form[i] == Form::Kivi))
      throw std::invalid_argument("KVCache::demote: the ladder's forms are full, int8, 4-bit and 2-bit tokens (KIVI "
                                  "entries stay KIVI; quantizeKivi makes them)");
    if (c.form[i] == Form::LowRank) throw std::logic_error("KVCache::demote: low-rank entries are not on the ladder");
    if (rung(to[k]) < rung(c.form[i])) cv.convert[i] = 1, cv.each[i] = to[k];
  }
  if (keep.size() == size_t(c.length()) && std::find(cv.convert.begin(), cv.convert.end(), 1) == cv.convert.end())
    return;  // nothing goes, nothing steps down
  if (std::find(cv.each.begin(), cv.each.end(), Form::Int8) != cv.each.end()) useCodes(8);
  rebuild(layer, head, keep, cv);
}

void KVCache::decodeEntry(const HeadCache& c, int layer, int head, int i, int row, float* k, float* v) const {
  const int hd = head_dim_, cb = code_bits_ ? codeBytes() : 0, r = lowrank_.rank;
  switch (c.form[i]) {
    case Form::Full:
      std::copy_n(c.keys.data() + int64_t(row) * hd, hd, k);
      std::copy_n(c.values.data() + int64_t(row) * hd, hd, v);
      break;
    case Form::Int8: {
      const uint8_t* codes = c.codes.data() + int64_t(row) * 2 * cb;
      const float* step = c.row_params.data() + int64_t(row) * rowParams();
      for (int ch = 0; ch < hd; ++ch) {
        k[ch] = float(int8_t(unpack(codes, ch, 8))) * step[0];
        v[ch] = float(int8_t(unpack(codes + cb, ch, 8))) * step[1];
      }
      break;
    }
    case Form::Kivi: {
      const uint8_t* codes = c.codes.data() + int64_t(row) * 2 * cb;
      const float* kp = c.key_params.data() + int64_t(c.kivi_group[row]) * 2 * hd;
      const float* vp = c.row_params.data() + int64_t(row) * rowParams();
      for (int ch = 0; ch < hd; ++ch) {
        k[ch] = Affine{kp[2 * ch], kp[2 * ch + 1]}.decode(unpack(codes, ch, code_bits_));
        const int j = ch / value_group_;
        v[ch] = Affine{vp[2 * j], vp[2 * j + 1]}.decode(unpack(codes + cb, ch, code_bits_));
      }
      break;
    }
    case Form::LowRank: {
      const size_t b = size_t(layer) * kv_heads_ + head;
      const float* z = c.coords.data() + int64_t(row) * 2 * r;
      reconstruct(z, lowrank_.keys[b].data(), hd, r, k);
      if (!lowrank_.rope_inv_freq.empty()) kernels::applyRope(k, 1, 1, hd, &c.positions[i], lowrank_.rope_inv_freq.data());
      reconstruct(z + r, lowrank_.values[b].data(), hd, r, v);
      break;
    }
    case Form::Token4:
    case Form::Token2: {
      const int t = tokenIndex(c.form[i]), bits = tokenBits(c.form[i]), tb = tokenCodeBytes(hd, c.form[i]),
                groups = tokenGroups(hd);
      const uint8_t* codes = c.token_codes[t].data() + int64_t(row) * 2 * tb;
      const float* params = c.token_params[t].data() + int64_t(row) * 4 * groups;
      for (int ch = 0; ch < hd; ++ch) {
        const int j = ch / kTokenGroup;
        k[ch] = Affine{params[2 * j], params[2 * j + 1]}.decode(unpack(codes, ch, bits));
        v[ch] = Affine{params[2 * (groups + j)], params[2 * (groups + j) + 1]}.decode(unpack(codes + tb, ch, bits));
      }
      break;
    }
  }
}

// Rebuilds a head's stores from the entries `keep`, converting those `cv` names: every store
// stays dense and in entry order, so an entry's row is the count of earlier entries of its form.
void KVCache::rebuild(int layer, int head, const std::vector<int>& keep, const Conversion& cv) {
  const HeadCache& c = this->head(layer, head);
  const int hd = head_dim_, n = c.length();
  const int cb = code_bits_ ? codeBytes() : 0, r = lowrank_.rank, row_params = rowParams();
  std::vector<int> row(static_cast<size_t>(n));
  int count[kForms] = {};
  for (int i = 0; i < n; ++i) row[i] = count[int(c.form[i])]++;
  // Full-precision rows of each new KIVI run's entries (decoded where stored coded), which its
  // keys' per-channel parameters are fitted over.
  std::vector<std::vector<float>> run_keys(cv.runs.size());
  for (size_t r = 0; r < cv.runs.size(); ++r)
    for (int i : cv.runs[r]) {
      std::vector<float> k(static_cast<size_t>(hd)), v(static_cast<size_t>(hd));
      decodeEntry(c, layer, head, i, row[i], k.data(), v.data());
      run_keys[r].insert(run_keys[r].end(), k.begin(), k.end());
    }
  // Key groups in the new stores: numbered in the order their first kept row comes.
  std::vector<int> old_group(c.group_rows.size(), -1), new_run(cv.runs.size(), -1);

  HeadCache out;
  std::vector<int> q(static_cast<size_t>(hd));
  auto pushCodes = [&](const std::vector<int>& codes, int code_bits) {
    out.codes.resize(out.codes.size() + cb);
    pack(codes.data(), hd, code_bits, out.codes.data() + out.codes.size() - cb);
  };
  int prev = -1;
  for (int i : keep) {
    if (i <= prev || i >= n) throw std::out_of_range("KVCache::retain: indices must ascend within the head");
    prev = i;
    out.positions.push_back(c.positions[i]);
    out.score.push_back(c.score[i]);
    out.history.push_back(c.history[i]);
    out.out_norm.push_back(c.out_norm[i]);
    const bool convert = !cv.convert.empty() && cv.convert[i];
    const Form f = !convert ? c.form[i] : cv.each.empty() ? cv.to : cv.each[i];
    out.form.push_back(f);
    if (!convert) {
      switch (f) {
        case Form::Full:
          if (rows_on_device_) break;
          appendRow(out.keys, c.keys, row[i], hd);
          appendRow(out.values, c.values, row[i], hd);
          break;
        case Form::Int8:
        case Form::Kivi:
          if (rows_on_device_) break;
          appendRow(out.codes, c.codes, row[i], 2 * cb);
          appendRow(out.row_params, c.row_params, row[i], row_params);
          if (f == Form::Kivi) {
            int& g = old_group[c.kivi_group[row[i]]];
            if (g < 0) {
              g = int(out.group_rows.size());
              appendRow(out.key_params, c.key_params, c.kivi_group[row[i]], 2 * hd);
              out.group_rows.push_back(0);
            }
            ++out.group_rows[g];
            out.kivi_group.push_back(g);
          }
          break;
        case Form::LowRank: appendRow(out.coords, c.coords, row[i], 2 * r); break;
        case Form::Token4:
        case Form::Token2: {
          const int t = tokenIndex(f);
          appendRow(out.token_codes[t], c.token_codes[t], row[i], 2 * tokenCodeBytes(hd, f));
          appendRow(out.token_params[t], c.token_params[t], row[i], 4 * tokenGroups(hd));
          break;
        }
      }
      continue;
    }
    // The entry's rows at full precision: the store itself, or decoded (a demotion of a coded entry).
    std::vector<float> decoded;
    const float* key = c.keys.data() + int64_t(row[i]) * hd;
    const float* value = c.values.data() + int64_t(row[i]) * hd;
    if (c.form[i] != Form::Full) {
      decoded.resize(size_t(2) * hd);
      decodeEntry(c, layer, head, i, row[i], decoded.data(), decoded.data() + hd);
      key = decoded.data(), value = decoded.data() + hd;
    }
    if (f == Form::Token4 || f == Form::Token2) {
      const int t = tokenIndex(f), bits = tokenBits(f), tb = tokenCodeBytes(hd, f);
      for (const float* x : {key, value}) {
        for (int ch = 0; ch < hd; ch += kTokenGroup) {
          const int w = std::min(kTokenGroup, hd - ch);
          const Affine a = fitAffine(x + ch, w, 1, bits);
          for (int j = 0; j < w; ++j) q[ch + j] = encodeAffine(x[ch + j], a, bits);
          out.token_params[t].insert(out.token_params[t].end(), {a.lo, a.step});
        }
        out.token_codes[t].resize(out.token_codes[t].size() + tb);
        pack(q.data(), hd, bits, out.token_codes[t].data() + out.token_codes[t].size() - tb);
      }
    } else if (f == Form::Int8) {
      for (const float* x : {key, value}) {
        const float step = fitInt8(x, hd);
        for (int ch = 0; ch < hd; ++ch) q[ch] = encodeInt8(x[ch], step);
        pushCodes(q, 8);
        out.row_params.push_back(step);
      }
    } else if (f == Form::Kivi) {
      const int r = cv.run_of[i];
      if (new_run[r] < 0) {  // keys: per channel over the run's entries
        new_run[r] = int(out.group_rows.size());
        for (int ch = 0; ch < hd; ++ch) {
          const Affine a = fitAffine(run_keys[r].data() + ch, int(cv.runs[r].size()), hd, code_bits_);
          out.key_params.insert(out.key_params.end(), {a.lo, a.step});
        }
        out.group_rows.push_back(0);
      }
      const float* kp = out.key_params.data() + int64_t(new_run[r]) * 2 * hd;
      for (int ch = 0; ch < hd; ++ch) q[ch] = encodeAffine(key[ch], {kp[2 * ch], kp[2 * ch + 1]}, code_bits_);
      pushCodes(q, code_bits_);
      for (int ch = 0; ch < hd; ch += value_group_) {  // values: per token over groups of channels
        const int w = std::min(value_group_, hd - ch);
        const Affine a = fitAffine(value + ch, w, 1, code_bits_);
        for (int j = 0; j < w; ++j) q[ch + j] = encodeAffine(value[ch + j], a, code_bits_);
        out.row_params.insert(out.row_params.end(), {a.lo, a.step});
      }
      pushCodes(q, code_bits_);
      ++out.group_rows[new_run[r]];
      out.kivi_group.push_back(new_run[r]);
    } else {  // low rank: keys leave their rotated frame (W_k acts before RoPE), then project
      const size_t b = size_t(layer) * kv_heads_ + head;
      std::vector<float> k(key, key + hd);
      const int back = -c.positions[i];
      if (!lowrank_.rope_inv_freq.empty()) kernels::applyRope(k.data(), 1, 1, hd, &back, lowrank_.rope_inv_freq.data());
      out.coords.resize(out.coords.size() + 2 * r);
      float* z = out.coords.data() + out.coords.size() - 2 * r;
      coordinates(k.data(), lowrank_.keys[b].data(), hd, r, z);
      coordinates(value, lowrank_.values[b].data(), hd, r, z + r);
    }
  }
  this->head(layer, head) = std::move(out);
}

HeadRows KVCache::rows(int layer, int head, std::vector<float>& scratch) const {
  const HeadCache& c = this->head(layer, head);
  if (rows_on_device_) {
    if (c.keys.size() != size_t(c.length()) * head_dim_)
      throw std::logic_error("KVCache: a device cache's rows are on the device (holdRows copies them down)");
    return {c.keys.data(), c.values.data()};
  }
  if (std::all_of(c.form.begin(), c.form.end(), [](Form f) { return f == Form::Full; }))
    return {c.keys.data(), c.values.data()};
  const int hd = head_dim_, n = c.length();
  scratch.resize(size_t(2) * n * hd);
  float* keys = scratch.data();
  float* values = keys + int64_t(n) * hd;
  int count[kForms] = {};
  for (int i = 0; i < n; ++i) {
    const int row = count[int(c.form[i])]++;
    decodeEntry(c, layer, head, i, row, keys + int64_t(i) * hd, values + int64_t(i) * hd);
  }
  return {keys, values};
}

void KVCache::decodeEntries(int layer, int head, const std::vector<int>& entries, float* k, float* v) const {
  const HeadCache& c = this->head(layer, head);
  if (rows_on_device_) throw std::logic_error("KVCache: a device cache's mirror holds no rows to decode");
  int count[kForms] = {};
  size_t next = 0;
  for (int i = 0; i < c.length() && next < entries.size(); ++i) {
    const int row = count[int(c.form[i])]++;
    if (i != entries[next]) continue;
    decodeEntry(c, layer, head, i, row, k + next * head_dim_, v + next * head_dim_);
    ++next;
  }
  if (next != entries.size()) throw std::out_of_range("KVCache::decodeEntries: entries must ascend and exist");
}

int64_t StoreShape::bytes(Form form, int64_t entries, int64_t runs) const {
  const int64_t hd = head_dim;
  if (entries == 0 && runs == 0) return 0;  // (a form the cache does not use has no shape)
  switch (form) {
    case Form::Full: return entries * 4 * hd;
    case Form::Int8: return entries * (2 * hd + 4);
    case Form::Kivi: {
      const int64_t code_bytes = (hd * code_bits + 7) / 8, value_groups = (hd + value_group - 1) / value_group;
      return entries * (2 * code_bytes + 4 * value_groups) + runs * (4 * hd + 2);
    }
    case Form::LowRank: return entries * 4 * int64_t(rank);
    case Form::Token4:
    case Form::Token2: return entries * (2 * ((hd * tokenBits(form) + 7) / 8) + 8 * ((hd + kTokenGroup - 1) / kTokenGroup));
  }
  return 0;
}

int64_t KVCache::storedBytes(int layer, int head) const {
  const HeadCache& c = this->head(layer, head);
  int64_t count[kForms] = {};
  for (Form f : c.form) ++count[int(f)];
  const StoreShape shape{head_dim_, code_bits_, value_group_, lowrank_.rank};
  int64_t bytes = 0;
  for (Form f : {Form::Full, Form::Int8, Form::Kivi, Form::LowRank, Form::Token4, Form::Token2})
    bytes += shape.bytes(f, count[int(f)], f == Form::Kivi ? int64_t(c.group_rows.size()) : 0);
  return bytes;
}

}  // namespace kvtp::kv
