// The passkey retrieval test of long-context benchmarks (Mohtashami & Jaggi 2023, as Yuan et al.
// 2024, "KV Cache Compression, But What Must We Give in Return?", run it): a 7-digit key in a
// sentence hidden at a chosen depth of long background text, asked for at the end; the model's
// answer is scored by exact match (the key appears in it) and partial match (the longest run of
// the key it reproduces, as a share of the key). Background text here: C4 documents.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tokenizer.h"

namespace kvtp {

struct PasskeyGrid {
  std::vector<int> lengths;  // prompt lengths in tokens (each prompt as long as fits)
  int depths = 5;            // key depths evenly from 0 % (after the instruction) to 100 % (before the question)
  int trials = 2;            // keys per (length, depth)
  int digits = 7;
  uint64_t seed = 0;         // draws the keys
};

struct PasskeyCase {
  int length = 0;       // the asked length, tokens
  double depth = 0;     // 0..1
  int trial = 0;
  std::string key;
  std::string prompt;
  int prompt_tokens = 0;  // <= length
};

// Every (length, depth, trial) of the grid, in that order. Throws Error when the background is too
// short for a length or a length cannot hold the instruction, key and question.
std::vector<PasskeyCase> passkeyCases(const Tokenizer& tokenizer, const std::vector<std::string>& documents,
                                      const PasskeyGrid& grid);

// 1 if the key appears in the response (both normalized: lower case, no punctuation or articles,
// single spaces), else 0.
double passkeyExactMatch(const std::string& key, const std::string& response);
// The longest common substring of key and response, as a share of the key's length.
double passkeyPartialMatch(const std::string& key, const std::string& response);

}  // namespace kvtp
