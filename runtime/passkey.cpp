#include "runtime/passkey.h"

#include <algorithm>
#include <cctype>

#include "kernels/splitmix.h"
#include "runtime/error.h"

namespace kvtp {
namespace {

const char* kInstruction =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you "
    "about the important information there.\n";
const char* kQuestion = "\nWhat is the pass key? The pass key is ";

// Words with the whitespace after each, so that words [i, j) joined back are the text between.
std::vector<std::string> words(const std::vector<std::string>& documents) {
  std::vector<std::string> out;
  for (const auto& d : documents) {
    size_t i = 0;
    while (i < d.size()) {
      size_t j = i;
      while (j < d.size() && !std::isspace(static_cast<unsigned char>(d[j]))) ++j;
      while (j < d.size() && std::isspace(static_cast<unsigned char>(d[j]))) ++j;
      if (j > i && !std::isspace(static_cast<unsigned char>(d[i]))) out.push_back(d.substr(i, j - i));
      i = j;
    }
    if (!out.empty() && !std::isspace(static_cast<unsigned char>(out.back().back()))) out.back() += ' ';
  }
  return out;
}

std::string joined(const std::vector<std::string>& w, size_t begin, size_t end) {
  std::string s;
  for (size_t i = begin; i < end; ++i) s += w[i];
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  return s;
}

// The prompt with the first `n` background words and the key sentence at word int(n * depth).
std::string prompt(const std::vector<std::string>& w, size_t n, double depth, const std::string& key) {
  const size_t at = size_t(double(n) * depth);
  const std::string target = "The pass key is " + key + ". Remember it. " + key + " is the pass key.";
  std::string content = joined(w, 0, at);
  content += (content.empty() ? "" : " ") + target;
  const std::string after = joined(w, at, n);
  if (!after.empty()) content += " " + after;
  return kInstruction + content + kQuestion;
}

std::string normalized(const std::string& s) {
  std::string t;
  for (unsigned char c : s)
    if (!std::ispunct(c)) t += char(std::tolower(c));
  std::string out, word;
  auto flush = [&] {
    if (!word.empty() && word != "a" && word != "an" && word != "the") out += (out.empty() ? "" : " ") + word;
    word.clear();
  };
  for (char c : t) {
    if (std::isspace(static_cast<unsigned char>(c))) flush();
    else word += c;
  }
  flush();
  return out;
}

}  // namespace

std::vector<PasskeyCase> passkeyCases(const Tokenizer& tokenizer, const std::vector<std::string>& documents,
                                      const PasskeyGrid& grid) {
  if (grid.depths < 1 || grid.trials < 1) throw Error("passkey: --depths and --trials must be at least 1");
  if (grid.digits < 1 || grid.digits > 64) throw Error("passkey: --digits must be in 1..64");
  if (grid.lengths.empty()) throw Error("passkey: no prompt length");
  const std::vector<std::string> w = words(documents);
  std::vector<PasskeyCase> out;
  for (size_t li = 0; li < grid.lengths.size(); ++li) {
    const int length = grid.lengths[li];
    for (int di = 0; di < grid.depths; ++di) {
      const double depth = grid.depths == 1 ? 0.0 : double(di) / (grid.depths - 1);
      for (int trial = 0; trial < grid.trials; ++trial) {
        PasskeyCase c{length, depth, trial, "", "", 0};
        using kernels::splitmix64;
        uint64_t h = splitmix64(splitmix64(splitmix64(grid.seed) ^ uint64_t(length)) ^ uint64_t(di)) ^ uint64_t(trial);
        for (int d = 0; d < grid.digits; ++d) c.key += char('0' + (h = splitmix64(h)) % 10);
        // The most background words that keep the prompt within `length` tokens.
        auto tokens = [&](size_t n) { return int(tokenizer.encode(prompt(w, n, depth, c.key)).size()); };
        if (tokens(0) > length)
          throw Error("passkey: a prompt of " + std::to_string(length) + " tokens cannot hold the instruction, key and "
                      "question (" + std::to_string(tokens(0)) + " tokens)");
        // Every word is at least one token: more than `length` words never fit.
        size_t lo = 0, hi = std::min(w.size(), size_t(length) + 1);
        if (tokens(hi) <= length)
          throw Error("passkey: the background text has too few words for prompts of " + std::to_string(length) +
                      " tokens: give more documents");
        while (hi - lo > 1) {  // tokens(lo) <= length < tokens(hi)
          const size_t mid = lo + (hi - lo) / 2;
          (tokens(mid) <= length ? lo : hi) = mid;
        }
        c.prompt = prompt(w, lo, depth, c.key);
        c.prompt_tokens = tokens(lo);
        out.push_back(std::move(c));
      }
    }
  }
  return out;
}

double passkeyExactMatch(const std::string& key, const std::string& response) {
  return normalized(response).find(normalized(key)) != std::string::npos ? 1.0 : 0.0;
}

double passkeyPartialMatch(const std::string& key, const std::string& response) {
  if (key.empty()) return 0;
  // Longest common substring by dynamic programming over (key, response) suffix pairs.
  size_t best = 0;
  std::vector<size_t> prev(response.size() + 1, 0), cur(response.size() + 1, 0);
  for (size_t i = 1; i <= key.size(); ++i) {
    for (size_t j = 1; j <= response.size(); ++j) {
      cur[j] = key[i - 1] == response[j - 1] ? prev[j - 1] + 1 : 0;
      best = std::max(best, cur[j]);
    }
    std::swap(prev, cur);
  }
  return double(best) / double(key.size());
}

}  // namespace kvtp
