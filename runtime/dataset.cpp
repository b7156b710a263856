#include "runtime/dataset.h"

#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "runtime/error.h"

namespace kvtp {

namespace {
std::string readMaybeGzip(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) throw Error("data file '" + path + "' does not exist");
  gzFile f = gzopen(path.c_str(), "rb");  // reads plain files unchanged
  if (!f) throw Error("cannot open '" + path + "'");
  std::string out;
  char buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.append(buf, size_t(n));
  int err = 0;
  const char* msg = gzerror(f, &err);
  const bool failed = n < 0 || (err != Z_OK && err != Z_STREAM_END);
  const std::string what = failed ? msg : "";
  gzclose(f);
  if (failed) throw Error("'" + path + "' is corrupt or truncated: " + what);
  return out;
}

std::string textOf(const nlohmann::json& doc, const std::string& where) {
  if (!doc.is_object() || !doc.contains("text") || !doc["text"].is_string())
    throw Error(where + ": expected a JSON object with a string \"text\" field");
  return doc["text"].get<std::string>();
}
}  // namespace

std::vector<std::string> readDocuments(const std::string& path, size_t max_docs) {
  const std::string data = readMaybeGzip(path);
  std::vector<std::string> docs;
  const size_t first = data.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) throw Error("'" + path + "' holds no documents");
  try {
    if (data[first] == '[') {
      for (auto& doc : nlohmann::json::parse(data)) {
        docs.push_back(textOf(doc, "'" + path + "'"));
        if (max_docs && docs.size() == max_docs) break;
      }
    } else {
      std::istringstream in(data);
      std::string line;
      for (size_t no = 1; std::getline(in, line); ++no) {
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        docs.push_back(textOf(nlohmann::json::parse(line), "'" + path + "' line " + std::to_string(no)));
        if (max_docs && docs.size() == max_docs) break;
      }
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error("'" + path + "' is not C4-style JSON lines: " + e.what());
  }
  return docs;
}

std::vector<std::vector<int>> readIdLines(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error("cannot read input-ids file '" + path + "'");
  std::vector<std::vector<int>> seqs;
  std::string line;
  for (size_t no = 1; std::getline(in, line); ++no) {
    std::istringstream ls(line);
    std::vector<int> ids;
    std::string tok;
    while (ls >> tok) {
      size_t used = 0;
      long v = -1;
      try {
        v = std::stol(tok, &used);
      } catch (const std::exception&) {
      }
      if (used != tok.size() || v < 0 || v > 0x7fffffff)
        throw Error("'" + path + "' line " + std::to_string(no) + ": '" + tok + "' is not a token id");
      ids.push_back(int(v));
    }
    if (!ids.empty()) seqs.push_back(std::move(ids));
  }
  if (seqs.empty()) throw Error("'" + path + "' holds no token ids");
  return seqs;
}

}  // namespace kvtp
