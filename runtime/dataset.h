// Text corpora for perplexity jobs: C4 in the allenai/c4 format (gzip'd JSON lines with a
// "text" field, e.g. c4-validation.00000-of-00008.json.gz), plain .jsonl/.json, or a JSON array
// of such objects; gzip is detected from the content, not the name.
#pragma once
#include <string>
#include <vector>

namespace kvtp {

// The "text" of each document, in file order; at most max_docs (0 = all).
std::vector<std::string> readDocuments(const std::string& path, size_t max_docs = 0);

// Token-id sequences, one per non-empty line of whitespace-separated integers.
std::vector<std::vector<int>> readIdLines(const std::string& path);

}  // namespace kvtp
