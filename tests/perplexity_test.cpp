// The windowing protocol of docs/PERPLEXITY.md, checked by hand on small cases.
#include <gtest/gtest.h>

#include <numeric>

#include "runtime/perplexity.h"
#include "runtime/dataset.h"
#include "runtime/error.h"
#include "runtime/gpu_engine.h"
#include "test_util.h"

namespace kvtp {
namespace {

std::vector<int> iota(int n) {
  std::vector<int> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

TEST(Windows, NonOverlappingKeepsTheShortTail) {
  const auto w = planWindows(iota(10), 4, 0, false);
  ASSERT_EQ(w.size(), 3u);
  EXPECT_EQ(w[0].ids, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(w[2].ids, (std::vector<int>{8, 9}));
  for (auto& x : w) EXPECT_EQ(x.score_from, 1);
  EXPECT_EQ(planWindows(iota(10), 4, 0, true).size(), 2u);  // drop_partial
  EXPECT_EQ(planWindows(iota(9), 4, 0, false).size(), 2u);  // a 1-token tail predicts nothing
}

TEST(Windows, SlidingScoresEachTokenOnce) {
  // seq 4, stride 2 over 8 tokens: [0..3] scores 1..3; [2..5] scores 4,5; [4..7] scores 6,7.
  const auto w = planWindows(iota(8), 4, 2, false);
  ASSERT_EQ(w.size(), 3u);
  EXPECT_EQ(w[1].ids, (std::vector<int>{2, 3, 4, 5}));
  EXPECT_EQ(w[1].score_from, 2);
  EXPECT_EQ(w[2].score_from, 2);
  int64_t scored = 0;
  for (auto& x : w) scored += x.scored();
  EXPECT_EQ(scored, 7);  // every token but the first
}

// The CPU engine holds one sequence: a batch of one decodes as a step does, more are refused.
TEST(CpuEngine, BatchOfOneIsAStepAndMoreAreRefused) {
  const auto model = Model::load(test::fixture("models/llama3-gqa"));
  auto engine = makeCpuEngine(*model, nullptr);
  const std::vector<int> ids = {5, 9, 14, 3, 7}, pos = iota(5);
  engine->reserve(1, 64);
  engine->useSequence(0);
  engine->step(ids.data(), pos.data(), 3, 0, 0, nullptr);
  const double batched = engine->decodeBatch(&ids[3], &pos[3], &ids[4]).at(0);
  engine->startWindow();
  engine->step(ids.data(), pos.data(), 3, 0, 0, nullptr);
  EXPECT_EQ(batched, engine->step(&ids[3], &pos[3], 1, 0, 1, &ids[4]).at(0));
  EXPECT_THROW(engine->reserve(2, 64), Error);
  EXPECT_THROW(engine->useSequence(1), Error);
}

TEST(Dataset, ReadsGzipJsonLinesAndArrays) {
  const auto docs = readDocuments("data/c4/c4-heldout-200.json.gz");
  EXPECT_EQ(docs.size(), 200u);
  EXPECT_EQ(readDocuments("data/c4/c4-heldout-200.json.gz", 3).size(), 3u);
  test::TempDir d;
  std::ofstream(d / "a.json") << R"([{"text": "one"}, {"text": "two", "url": "x"}])";
  EXPECT_EQ(readDocuments(d / "a.json"), (std::vector<std::string>{"one", "two"}));
  std::ofstream(d / "b.jsonl") << "{\"text\": \"x\"}\n{\"txt\": \"y\"}\n";
  EXPECT_THROW(readDocuments(d / "b.jsonl"), Error);
  EXPECT_THROW(readDocuments(d / "missing.json.gz"), Error);
}

TEST(Dataset, TruncatedGzipIsAnError) {
  test::TempDir d;
  std::filesystem::copy("data/c4/c4-heldout-200.json.gz", d / "t.json.gz");
  std::filesystem::resize_file(d / "t.json.gz", 5000);
  EXPECT_THROW(readDocuments(d / "t.json.gz"), Error);
}

TEST(Dataset, IdLinesRejectNonNumbers) {
  test::TempDir d;
  std::ofstream(d / "ids.txt") << "1 2 3\n\n4 5\n";
  EXPECT_EQ(readIdLines(d / "ids.txt").size(), 2u);
  std::ofstream(d / "bad.txt") << "1 2 x3\n";
  EXPECT_THROW(readIdLines(d / "bad.txt"), Error);
}

}  // namespace
}  // namespace kvtp
