// Tensor and data parallelism under a real `mpirun` with 1, 2, 4 and 8 ranks (oversubscribed on CI's
// 2 cores, one OpenMP thread per rank): log-probs equal the single-process run within 1e-4 and
// Hugging Face's within 1e-3; failing ranks end the job with their error instead of hanging.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>

#include "test_util.h"

namespace kvtp {
namespace {

// Each rank gets an equal share of the cores (at least one OpenMP thread).
std::string mpirun(int np) {
  const int threads = std::max(1, int(std::thread::hardware_concurrency()) / np);
  return "OMP_NUM_THREADS=" + std::to_string(threads) +
         " timeout 300 mpirun --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS -np " +
         std::to_string(np) + " ";
}

std::vector<std::vector<double>> readLogprobs(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::vector<double>> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line)["logprobs"].get<std::vector<double>>());
  return out;
}

double maxDiff(const std::vector<std::vector<double>>& a, const std::vector<std::vector<double>>& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t s = 0; s < std::min(a.size(), b.size()); ++s) {
    EXPECT_EQ(a[s].size(), b[s].size()) << "sequence " << s;
    for (size_t i = 0; i < std::min(a[s].size(), b[s].size()); ++i)
      worst = std::max(worst, std::abs(a[s][i] - b[s][i]));
  }
  return worst;
}

// Runs `kvtp ppl ARGS --logprobs` under mpirun -np np (np 0: plain process) and returns the log-probs.
std::vector<std::vector<double>> logprobs(int np, const std::string& args) {
  test::TempDir d;
  const auto r = test::run((np ? mpirun(np) : std::string()) + test::kvtpBinary() + " ppl " + args +
                           " --quiet --json --logprobs " + (d / "lp.jsonl"));
  EXPECT_EQ(r.status, 0) << r.err;
  return readLogprobs(d / "lp.jsonl");
}

class TensorParallel : public ::testing::TestWithParam<std::string> {};

TEST_P(TensorParallel, Tp2AndTp4MatchTp1AndTransformers) {
  const std::string dir = test::fixture("models/" + GetParam());
  const auto ref = test::readJsonFile(dir + "/reference.json");
  std::vector<std::vector<double>> hf;
  for (auto& s : ref["sequences"]) hf.push_back(s["logprobs"].get<std::vector<double>>());
  const std::string args = "--model " + dir + " --input-ids " + dir + "/input_ids.txt";
  const auto tp1 = logprobs(0, args);
  EXPECT_LE(maxDiff(tp1, hf), 1e-3);
  for (int np : {1, 2, 4}) {
    const auto tp = logprobs(np, args);
    EXPECT_LE(maxDiff(tp, tp1), 1e-4) << "np " << np;
    EXPECT_LE(maxDiff(tp, hf), 1e-3) << "np " << np;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TensorParallel,
                         ::testing::Values("opt-preln", "opt-postln-proj", "llama3-gqa", "llama2-tied",
                                           "llama-sharded-bf16"),
                         [](const auto& info) { return test::paramName(info.param); });

// Every rank samples the same token (one seed, one decision): greedy, sampled and under a KV
// budget shared by all ranks, tp 2 and 4 (replicated KV heads) generate what one process does.
TEST(TensorParallelGenerate, Tp2And4GenerateWhatTp1Generates) {
  const std::string dir = test::fixture("models/llama3-gqa");
  for (const std::string opts : {"", " --temperature 0.9 --top-k 50 --seed 11", " --kv h2o:budget=0.5,recent=4"}) {
    auto ids = [&](int np) {
      const auto r = test::run((np ? mpirun(np) : std::string()) + test::kvtpBinary() + " generate --model " + dir +
                               " --prompt 'the first prompt' --prompt 'and a second one' --max-new-tokens 24"
                               " --ignore-eos --json" + opts + " | tail -1");
      EXPECT_EQ(r.status, 0) << r.err;
      const auto result = nlohmann::json::parse(r.out);
      nlohmann::json out = nlohmann::json::array();
      for (auto& s : result["sequences"]) out.push_back(s["ids"]);
      return out;
    };
    const auto tp1 = ids(0);
    ASSERT_EQ(tp1.size(), 2u);
    EXPECT_EQ(tp1[0].size(), 24u);
    for (int np : {2, 4}) EXPECT_EQ(ids(np), tp1) << "np " << np << opts;
  }
}

TEST(TensorParallelDecode, Tp2DecodeMatchesTp1Prefill) {
  const std::string dir = test::fixture("models/llama3-gqa");
  const std::string args = "--model " + dir + " --input-ids " + dir + "/input_ids.txt";
  EXPECT_LE(maxDiff(logprobs(2, args + " --mode decode"), logprobs(0, args)), 1e-4);
}

TEST(DataParallel, TwoGroupsOfTwoMatchOneProcess) {
  const std::string args =
      "--model models/kvtp-opt-3m --data data/c4/c4-heldout-200.json.gz --seq-len 256 --max-windows 5";
  const auto one = logprobs(0, args);
  const auto groups = logprobs(4, args + " --tp 2");
  ASSERT_EQ(one.size(), 5u);
  EXPECT_LE(maxDiff(groups, one), 1e-4);
}

class Synthetic66b : public ::testing::TestWithParam<std::string> {};

// Two full-width layers of the 66B-class shapes at tp 2, 4 and 8: what CI's CPUs can run of the
// 4-8 GPU work (issue 9).
TEST_P(Synthetic66b, TwoLayersAtTp2To8MatchTp1) {
  const std::string args = "--synthetic " + GetParam() + " --layers 2 --input-ids tests/data/synthetic_ids.txt";
  const auto tp1 = logprobs(1, args);
  ASSERT_EQ(tp1.size(), 2u);
  for (int np : {2, 4, 8}) EXPECT_LE(maxDiff(logprobs(np, args), tp1), 1e-4) << "np " << np;
}

INSTANTIATE_TEST_SUITE_P(Shapes, Synthetic66b, ::testing::Values("opt-66b", "llama-2-70b"),
                         [](const auto& info) { return test::paramName(info.param); });

// The same KV decisions at every tp on a Llama-2-70B shape: H2O under one global budget over its 8
// KV heads (one per rank at tp 8). Keeping other tokens would move the log-probs by far more than
// 1e-4 (the budget moves them by nats).
TEST(Synthetic66bCompressed, H2oAtTp2To8KeepsWhatTp1Keeps) {
  const std::string args = "--synthetic llama-2-70b --layers 2 --input-ids tests/data/synthetic_ids.txt --mode decode";
  const std::string h2o = args + " --kv h2o:budget=0.3,sinks=1,recent=2";
  const auto tp1 = logprobs(0, h2o);
  EXPECT_GT(maxDiff(tp1, logprobs(0, args)), 0.1) << "the budget should change something";
  for (int np : {2, 4, 8}) EXPECT_LE(maxDiff(logprobs(np, h2o), tp1), 1e-4) << "np " << np;
}

// Compressed caches under one global budget: the same tokens are kept at every tp (decisions are
// taken from an all-reduced score table), so log-probs match tp 1. llama3-gqa has 2 KV heads, so
// tp 4 also covers replicated KV heads.
class CompressedAcrossTp : public ::testing::TestWithParam<std::string> {};

TEST_P(CompressedAcrossTp, LogprobsMatchTp1) {
  const std::string dir = test::fixture("models/llama3-gqa");
  const std::string args = "--model " + dir + " --input-ids " + dir + "/input_ids.txt --mode decode " + GetParam();
  const auto tp1 = logprobs(0, args);
  const auto full = logprobs(0, "--model " + dir + " --input-ids " + dir + "/input_ids.txt --mode decode");
  EXPECT_GT(maxDiff(tp1, full), 1e-3) << "the budget should change something";
  for (int np : {2, 4}) EXPECT_LE(maxDiff(logprobs(np, args), tp1), 1e-4) << "np " << np;
}

INSTANTIATE_TEST_SUITE_P(
    Methods, CompressedAcrossTp,
    ::testing::Values("--kv streamingllm:budget=0.3", "--kv h2o:budget=0.3", "--kv scissorhands:budget=0.3",
                      "--kv snapkv:budget=0.3 --prefill 48", "--kv pyramidkv:budget=0.3 --prefill 48",
                      "--kv h2o:budget=0.3,scope=layer --kv-quant kivi:bits=4,group=8,residual=16",
                      "--kv streamingllm:budget=0.5 --kv-lowrank cskv:rank=4,window=8",
                      "--kv snapkv:budget=0.3,decode=slide,decode_budget=12,decode_recent=4 --prefill 32",
                      "--kv random:budget=0.3,seed=7", "--kv tova:budget=0.3",
                      "--kv knorm:budget=0.3 --kv-quant int8", "--kv keydiff:budget=0.3,scope=layer",
                      "--kv lagkv:budget=0.3,lag=8", "--kv h2o:budget=0.3,interval=4", "--kv h2o:budget=0.3,chunk=4",
                      "--kv simlayerkv:sinks=2,recent=8,threshold=0.3 --prefill 48",
                      "--kv keydiff:budget=1,evict_below=-0.2", "--kv h2o:budget=0.3,ladder=fp16/int8/int4/int2",
                      "--kv snapkv:budget=0.2,ladder=fp16/int4,scope=layer --prefill 48", "--kv leverage:budget=0.3",
                      "--kv cur:budget=0.3,local=8", "--kv expected:budget=0.3,future=64",
                      "--kv tova:budget=0.3,critical=0.5", "--kv keydiff:budget=0.3,block=16 --prefill 48",
                      "--kv noncausal:budget=0.3,span=16 --prefill 48", "--kv compactor:budget=0.3,span=16 --prefill 48",
                      "--kv finch:budget=0.3,window=8 --prefill 48",
                      "--kv snapkv:budget=0.5,think=0.5 --prefill 48",
                      "--kv qfilters:budget=0.3,filters=tests/data/llama3-gqa-qfilters.json",
                      "--kv h2o:budget=0.5,sinks=1,recent=2,ladder=fp16/int4/kivi2"),
    [](const auto& info) { return "m" + std::to_string(info.index); });

// The fixtures' PyTorch copies (scripts/make_fixtures.py --torch-copies) under tensor
// parallelism: each rank reads its slices of the pickled shards, and the log-probs are the
// safetensors original's.
TEST(TorchCheckpoint, Tp2And4MatchTheSafetensorsCopy) {
  const std::string bin = test::fixture("torch/llama-sharded-bf16"), st = test::fixture("models/llama-sharded-bf16");
  if (!std::filesystem::exists(bin)) GTEST_SKIP() << bin << " not made";
  const std::string ids = " --input-ids " + st + "/input_ids.txt";
  for (int np : {2, 4})  // the same weights split the same way: the same log-probs to the bit
    EXPECT_EQ(maxDiff(logprobs(np, "--model " + bin + ids), logprobs(np, "--model " + st + ids)), 0.0) << "np " << np;
}

TEST(Faults, FailingRankEndsTheJobWithItsError) {
  const auto r =
      test::run(mpirun(2) + "bash -c 'm=models/kvtp-opt-3m; [ $OMPI_COMM_WORLD_RANK = 1 ] && m=/nonexistent; " +
                test::kvtpBinary() + " ppl --model $m --data data/c4/c4-heldout-200.json.gz --max-windows 2'");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.status, 124) << "the job hung until the timeout";
  EXPECT_NE(r.err.find("kvtp: error: rank 1: model folder '/nonexistent' does not exist"), std::string::npos) << r.err;
}

TEST(Faults, MismatchedJobsAcrossRanksAreDetected) {
  const auto r = test::run(mpirun(2) + "bash -c 's=128; [ $OMPI_COMM_WORLD_RANK = 1 ] && s=64; " + test::kvtpBinary() +
                           " ppl --model tests/fixtures/models/opt-preln --input-ids "
                           "tests/fixtures/models/opt-preln/input_ids.txt --seq-len $s'");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("differs between rank 0 and rank 1"), std::string::npos) << r.err;
}

TEST(Faults, MismatchedKvSpecsAcrossRanksAreDetected) {
  const auto r = test::run(mpirun(2) + "bash -c 'b=0.3; [ $OMPI_COMM_WORLD_RANK = 1 ] && b=0.5; " + test::kvtpBinary() +
                           " ppl --model tests/fixtures/models/llama3-gqa --input-ids "
                           "tests/fixtures/models/llama3-gqa/input_ids.txt --kv h2o:budget=$b'");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("differs between rank 0 and rank 1"), std::string::npos) << r.err;
}

TEST(Faults, IndivisibleHeadsAreAClearError) {
  const auto r = test::run(
      mpirun(3) + test::kvtpBinary() +
      " ppl --model tests/fixtures/models/opt-preln --input-ids tests/fixtures/models/opt-preln/input_ids.txt");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("num_attention_heads 4 is not divisible by --tp 3"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace kvtp
