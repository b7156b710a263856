#include "runtime/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <sentencepiece_processor.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "runtime/error.h"

namespace kvtp {
namespace fs = std::filesystem;
using json = nlohmann::json;

std::string replaceInvalidUtf8(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(s[i]); };
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = byte(i);
    if (c < 0x80) {
      out += char(c), ++i;
      continue;
    }
    // Continuation bytes a lead needs, and the range its first one must fall in (which rules out
    // overlong forms, surrogates and code points past U+10FFFF).
    int need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c == 0xE0) need = 2, lo = 0xA0;
    else if (c == 0xED) need = 2, hi = 0x9F;
    else if (c >= 0xE1 && c <= 0xEF) need = 2;
    else if (c == 0xF0) need = 3, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3) need = 3;
    else if (c == 0xF4) need = 3, hi = 0x8F;
    size_t j = i + 1;
    bool ok = need > 0;
    for (int k = 0; ok && k < need; ++k, ++j) {
      ok = j < s.size() && byte(j) >= (k ? 0x80 : lo) && byte(j) <= (k ? 0xBF : hi);
      if (!ok) break;
    }
    if (ok) out.append(s, i, j - i);
    else out += "\xEF\xBF\xBD";
    i = std::max(j, i + 1);  // a bad sequence ends where it went wrong (that byte starts the next)
  }
  return out;
}

namespace {

// Bytes at the end of `s` that open a UTF-8 character not yet complete.
size_t incompleteUtf8Tail(const std::string& s) {
  for (size_t back = 1; back <= std::min<size_t>(3, s.size()); ++back) {
    const unsigned char c = static_cast<unsigned char>(s[s.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back
    const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    return need > back ? back : 0;
  }
  return 0;
}

}  // namespace

std::vector<int> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids = encodeText(text);
  if (addsBos()) ids.insert(ids.begin(), bos_id_);
  return ids;
}

namespace {

json readJson(const fs::path& p) {
  std::ifstream in(p);
  if (!in) throw Error("cannot read '" + p.string() + "'");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    throw Error("'" + p.string() + "' is not valid JSON: " + e.what());
  }
}

// tokenizer_config.json, if present (special tokens may be strings or {"content": ...}).
json tokenizerConfig(const fs::path& dir) {
  const auto p = dir / "tokenizer_config.json";
  return fs::exists(p) ? readJson(p) : json::object();
}

std::string tokenString(const json& cfg, const char* key) {
  if (!cfg.contains(key) || cfg[key].is_null()) return "";
  if (cfg[key].is_string()) return cfg[key].get<std::string>();
  if (cfg[key].is_object() && cfg[key].contains("content")) return cfg[key]["content"].get<std::string>();
  return "";
}

const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// A compiled Unicode regex that splits text into pieces (matches and the gaps between them).
class Splitter {
 public:
  explicit Splitter(const std::string& pattern) {
    int err;
    PCRE2_SIZE off;
    re_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(),
                        PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &off, nullptr);
    if (!re_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw Error("tokenizer split regex does not compile at offset " + std::to_string(off) + ": " +
                  reinterpret_cast<char*>(msg));
    }
    pcre2_jit_compile(re_, PCRE2_JIT_COMPLETE);
  }
  ~Splitter() { pcre2_code_free(re_); }
  Splitter(const Splitter&) = delete;
  Splitter& operator=(const Splitter&) = delete;

  template <class F>
  void split(std::string_view s, F&& piece) const {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(re_, nullptr);
    size_t pos = 0, gap = 0;
    while (pos < s.size()) {
      const int rc = pcre2_match(re_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, 0, md, nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[0] > gap) piece(s.substr(gap, ov[0] - gap));
      if (ov[1] > ov[0]) piece(s.substr(ov[0], ov[1] - ov[0]));
      gap = ov[1];
      pos = ov[1] > ov[0] ? ov[1] : ov[0] + 1;
    }
    if (gap < s.size()) piece(s.substr(gap));
    pcre2_match_data_free(md);
  }

 private:
  pcre2_code* re_ = nullptr;
};

// GPT-2's reversible byte -> printable-unicode table, each entry as UTF-8.
std::vector<std::string> byteToUnicode() {
  std::vector<std::string> table(256);
  auto utf8 = [](int cp) {
    std::string s;
    if (cp < 0x80) s += char(cp);
    else {
      s += char(0xC0 | (cp >> 6));
      s += char(0x80 | (cp & 0x3F));
    }
    return s;
  };
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    table[b] = utf8(printable ? b : 256 + n++);
  }
  return table;
}

// Byte-level BPE: regex pre-split, bytes mapped to GPT-2's unicode alphabet, merges by rank.
class ByteLevelBpe : public Tokenizer {
 public:
  // `added`: tokens matched verbatim before the split; `special`: the ids decode leaves out.
  ByteLevelBpe(std::unordered_map<std::string, int> vocab, const std::vector<std::pair<std::string, std::string>>& merges,
               const std::string& pattern, std::vector<std::string> added, std::vector<int> special, bool ignore_merges,
               std::string kind)
      : vocab_(std::move(vocab)), splitter_(pattern), bytes_(byteToUnicode()), added_(std::move(added)),
        ignore_merges_(ignore_merges), kind_(std::move(kind)) {
    for (size_t i = 0; i < merges.size(); ++i) ranks_.emplace(merges[i].first + ' ' + merges[i].second, int(i));
    for (auto& [tok, id] : vocab_) max_id_ = std::max(max_id_, id);
    tokens_.resize(size_t(max_id_ + 1));
    for (auto& [tok, id] : vocab_) tokens_[size_t(id)] = tok;
    for (int b = 0; b < 256; ++b) byte_of_.emplace(bytes_[b], char(b));
    for (const auto& a : added_) verbatim_.insert(vocab_.at(a));
    special_.insert(special.begin(), special.end());
  }
  void setBos(int id, bool add) {
    bos_id_ = id;
    add_bos_ = add;
  }
  int idOf(const std::string& token) const {
    auto it = vocab_.find(token);
    return it == vocab_.end() ? -1 : it->second;
  }
  int vocabSize() const override { return max_id_ + 1; }
  std::string kind() const override { return kind_; }

  // The byte-level decoder: the tokens' bytes, then from_utf8_lossy.
  std::string decode(const std::vector<int>& ids) const override { return replaceInvalidUtf8(bytesOf(ids)); }
  std::string decodeSettled(const std::vector<int>& ids) const override {
    const std::string bytes = bytesOf(ids);
    return replaceInvalidUtf8(bytes.substr(0, bytes.size() - incompleteUtf8Tail(bytes)));
  }

 private:
  std::string bytesOf(const std::vector<int>& ids) const {
    std::string text;
    for (int id : ids) {
      if (id < 0 || id > max_id_ || special_.count(id) || tokens_[size_t(id)].empty()) continue;
      const std::string& token = tokens_[size_t(id)];
      if (verbatim_.count(id)) {
        text += token;
        continue;
      }
      // Each symbol is one byte in GPT-2's printable alphabet (1 or 2 UTF-8 bytes).
      for (size_t i = 0; i < token.size();) {
        const size_t n = (static_cast<unsigned char>(token[i]) & 0xE0) == 0xC0 ? 2 : 1;
        auto b = byte_of_.find(token.substr(i, n));
        if (b != byte_of_.end()) text += b->second;
        i += n;
      }
    }
    return text;
  }

  std::vector<int> encodeText(const std::string& text) const override {
    std::vector<int> ids;
    // Added (special) tokens are matched verbatim first, as Hugging Face does; text between
    // them goes through the regex and BPE.
    size_t start = 0;
    std::string_view s(text);
    while (start <= s.size()) {
      size_t best = std::string_view::npos, best_len = 0;
      for (const auto& a : added_) {
        const size_t p = s.find(a, start);
        if (p < best || (p == best && a.size() > best_len)) {
          best = p;
          best_len = a.size();
        }
      }
      const size_t end = best == std::string_view::npos ? s.size() : best;
      splitter_.split(s.substr(start, end - start), [&](std::string_view piece) { encodeWord(piece, ids); });
      if (best == std::string_view::npos) break;
      ids.push_back(vocab_.at(std::string(s.substr(best, best_len))));
      start = best + best_len;
    }
    return ids;
  }

 private:
  void encodeWord(std::string_view piece, std::vector<int>& ids) const {
    std::string mapped;
    for (unsigned char b : piece) mapped += bytes_[b];
    if (auto it = cache_.find(mapped); it != cache_.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
    std::vector<int> out;
    if (auto it = vocab_.find(mapped); ignore_merges_ && it != vocab_.end()) {
      out.push_back(it->second);
    } else {
      // Symbols start as single mapped bytes (1 or 2 UTF-8 bytes each).
      std::vector<std::string> sym;
      for (unsigned char b : piece) sym.push_back(bytes_[b]);
      while (sym.size() > 1) {
        int best_rank = std::numeric_limits<int>::max();
        size_t best_i = 0;
        for (size_t i = 0; i + 1 < sym.size(); ++i) {
          auto r = ranks_.find(sym[i] + ' ' + sym[i + 1]);
          if (r != ranks_.end() && r->second < best_rank) {
            best_rank = r->second;
            best_i = i;
          }
        }
        if (best_rank == std::numeric_limits<int>::max()) break;
        const std::string a = sym[best_i], b = sym[best_i + 1];
        std::vector<std::string> next;
        for (size_t i = 0; i < sym.size(); ++i) {
          if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b) {
            next.push_back(a + b);
            ++i;
          } else {
            next.push_back(sym[i]);
          }
        }
        sym.swap(next);
      }
      for (auto& t : sym) {
        auto it = vocab_.find(t);
        if (it == vocab_.end()) throw Error("tokenizer: BPE symbol '" + t + "' is not in the vocabulary");
        out.push_back(it->second);
      }
    }
    if (cache_.size() > 1'000'000) cache_.clear();
    cache_.emplace(mapped, out);
    ids.insert(ids.end(), out.begin(), out.end());
  }

  std::unordered_map<std::string, int> vocab_;
  std::unordered_map<std::string, int> ranks_;
  Splitter splitter_;
  std::vector<std::string> bytes_;
  std::vector<std::string> added_;
  bool ignore_merges_;
  std::string kind_;
  int max_id_ = -1;
  std::vector<std::string> tokens_;               // by id
  std::unordered_map<std::string, char> byte_of_;  // GPT-2's alphabet back to bytes
  std::set<int> verbatim_, special_;               // added tokens; those decode leaves out
  mutable std::unordered_map<std::string, std::vector<int>> cache_;  // not thread-safe
};

class SentencePiece : public Tokenizer {
 public:
  SentencePiece(const fs::path& model, const json& cfg) {
    const auto st = sp_.Load(model.string());
    if (!st.ok()) throw Error("cannot load SentencePiece model '" + model.string() + "': " + st.ToString());
    bos_id_ = sp_.bos_id();
    add_bos_ = cfg.value("add_bos_token", true);  // LlamaTokenizer's default
  }
  std::vector<int> encodeText(const std::string& text) const override {
    std::vector<int> ids;
    const auto st = sp_.Encode(text, &ids);
    if (!st.ok()) throw Error("SentencePiece failed to encode: " + st.ToString());
    return ids;
  }
  int vocabSize() const override { return sp_.GetPieceSize(); }
  // As transformers' Llama tokenizer decodes (tokenizers' decoders Replace("\u2581", " "),
  // ByteFallback, Fuse, Strip(left 1)): control and unknown pieces left out, a run of byte pieces
  // (<0xNN>) kept when its bytes are UTF-8 and otherwise one U+FFFD a byte, one leading space off.
  std::string decode(const std::vector<int>& ids) const override {
    std::string text, run;
    auto flush = [&] {
      if (replaceInvalidUtf8(run) == run) text += run;
      else for (size_t i = 0; i < run.size(); ++i) text += "\xEF\xBF\xBD";
      run.clear();
    };
    for (int id : ids) {
      if (id < 0 || id >= sp_.GetPieceSize() || sp_.IsControl(id) || sp_.IsUnknown(id)) continue;
      const std::string piece = sp_.IdToPiece(id);
      if (sp_.IsByte(id)) {  // "<0xNN>"
        run += char(std::stoi(piece.substr(3, 2), nullptr, 16));
        continue;
      }
      flush();
      for (size_t at = 0; at < piece.size();) {  // U+2581 (the word boundary) is a space
        if (piece.compare(at, 3, "\xE2\x96\x81") == 0) text += ' ', at += 3;
        else text += piece[at++];
      }
    }
    flush();
    if (!text.empty() && text[0] == ' ') text.erase(0, 1);
    return text;
  }
  // Up to the trailing run of byte pieces, which more bytes may turn into a character.
  std::string decodeSettled(const std::vector<int>& ids) const override {
    size_t end = ids.size();
    while (end > 0 && ids[end - 1] >= 0 && ids[end - 1] < sp_.GetPieceSize() && sp_.IsByte(ids[end - 1])) --end;
    return decode(std::vector<int>(ids.begin(), ids.begin() + int64_t(end)));
  }
  std::string kind() const override { return "sentencepiece"; }

 private:
  sentencepiece::SentencePieceProcessor sp_;
};

std::unique_ptr<Tokenizer> loadGpt2(const fs::path& dir, const json& cfg) {
  const json vj = readJson(dir / "vocab.json");
  std::unordered_map<std::string, int> vocab;
  for (auto& [tok, id] : vj.items()) vocab[tok] = id.get<int>();
  std::ifstream in(dir / "merges.txt");
  if (!in) throw Error("cannot read '" + (dir / "merges.txt").string() + "'");
  std::vector<std::pair<std::string, std::string>> merges;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line.rfind("#version", 0) == 0) continue;
    const auto sp = line.find(' ');
    if (sp == std::string::npos) throw Error("merges.txt: malformed line '" + line + "'");
    merges.emplace_back(line.substr(0, sp), line.substr(sp + 1));
  }
  std::vector<std::string> specials;
  std::vector<int> special_ids;
  for (const char* k : {"bos_token", "eos_token", "unk_token", "pad_token"})
    if (auto s = tokenString(cfg, k); !s.empty() && vocab.count(s)) specials.push_back(s), special_ids.push_back(vocab[s]);
  auto tok = std::make_unique<ByteLevelBpe>(std::move(vocab), merges, kGpt2Pattern, specials, special_ids, false,
                                            "gpt2-bpe");
  tok->setBos(tok->idOf(tokenString(cfg, "bos_token")), cfg.value("add_bos_token", false));
  return tok;
}

// The split regex and its behaviour from tokenizer.json's pre_tokenizer (byte-level only).
std::string preTokenizerPattern(const json& pre) {
  if (pre.is_null()) throw Error("tokenizer.json: no pre_tokenizer; only byte-level BPE is supported");
  const auto type = pre.value("type", "");
  if (type == "ByteLevel") {
    if (pre.value("add_prefix_space", false))
      throw Error("tokenizer.json: ByteLevel add_prefix_space=true is not supported");
    return kGpt2Pattern;
  }
  if (type == "Sequence") {
    std::string pattern;
    bool byte_level = false;
    for (auto& p : pre["pretokenizers"]) {
      const auto t = p.value("type", "");
      if (t == "Split") {
        if (p.value("behavior", "") != "Isolated" || p.value("invert", false))
          throw Error("tokenizer.json: only Split with behavior Isolated is supported");
        pattern = p["pattern"].contains("Regex") ? p["pattern"]["Regex"].get<std::string>()
                                                 : p["pattern"]["String"].get<std::string>();
      } else if (t == "ByteLevel") {
        byte_level = true;
        if (p.value("use_regex", true)) pattern = pattern.empty() ? kGpt2Pattern : pattern;
      } else {
        throw Error("tokenizer.json: pre-tokenizer '" + t + "' is not supported");
      }
    }
    if (!byte_level || pattern.empty()) throw Error("tokenizer.json: only byte-level BPE is supported");
    return pattern;
  }
  throw Error("tokenizer.json: pre-tokenizer '" + type + "' is not supported (ByteLevel, Sequence)");
}

// The BOS a TemplateProcessing post-processor puts first, or -1.
int templateBos(const json& post) {
  if (post.is_null()) return -1;
  if (post.value("type", "") == "Sequence") {
    for (auto& p : post["processors"])
      if (int id = templateBos(p); id >= 0) return id;
    return -1;
  }
  if (post.value("type", "") != "TemplateProcessing" || post["single"].empty()) return -1;
  const auto& first = post["single"][0];
  if (!first.contains("SpecialToken")) return -1;
  const auto name = first["SpecialToken"]["id"].get<std::string>();
  return post["special_tokens"][name]["ids"][0].get<int>();
}

std::unique_ptr<Tokenizer> loadTokenizerJson(const fs::path& path, const json& cfg) {
  const json j = readJson(path);
  const auto& m = j["model"];
  if (m.value("type", "") != "BPE") throw Error("'" + path.string() + "': only BPE models are supported");
  if (!j["normalizer"].is_null())
    throw Error("'" + path.string() + "': normalizers are not supported (byte-level BPE has none)");
  std::unordered_map<std::string, int> vocab;
  for (auto& [tok, id] : m["vocab"].items()) vocab[tok] = id.get<int>();
  std::vector<std::pair<std::string, std::string>> merges;
  for (auto& e : m["merges"]) {
    if (e.is_array()) {
      merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
    } else {
      const auto s = e.get<std::string>();
      const auto sp = s.find(' ');
      merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    }
  }
  std::vector<std::string> added;
  std::vector<int> special;
  for (auto& a : j["added_tokens"]) {
    added.push_back(a["content"].get<std::string>());
    vocab[added.back()] = a["id"].get<int>();
    if (a.value("special", false)) special.push_back(a["id"].get<int>());
  }
  auto tok = std::make_unique<ByteLevelBpe>(std::move(vocab), merges, preTokenizerPattern(j["pre_tokenizer"]), added,
                                            special, m.value("ignore_merges", false), "tokenizer.json-bpe");
  const int bos = templateBos(j["post_processor"]);
  if (bos >= 0) tok->setBos(bos, true);
  else tok->setBos(tok->idOf(tokenString(cfg, "bos_token")), cfg.value("add_bos_token", false));
  return tok;
}

}  // namespace

std::unique_ptr<Tokenizer> loadTokenizer(const std::string& model_dir) {
  const fs::path dir(model_dir);
  const json cfg = tokenizerConfig(dir);
  // tokenizer.model first: Llama 1/2 folders ship a Metaspace tokenizer.json beside it.
  if (fs::exists(dir / "tokenizer.model")) return std::make_unique<SentencePiece>(dir / "tokenizer.model", cfg);
  if (fs::exists(dir / "tokenizer.json")) return loadTokenizerJson(dir / "tokenizer.json", cfg);
  if (fs::exists(dir / "vocab.json") && fs::exists(dir / "merges.txt")) return loadGpt2(dir, cfg);
  throw Error("'" + model_dir + "' has no tokenizer (tokenizer.model, tokenizer.json, or vocab.json + merges.txt)");
}

}  // namespace kvtp
