// The `kvtp ppl` contract as other tools see it: exactly one JSON object on stdout with the
// named fields, --logprobs lines, and one clear error line with a non-zero exit on bad input.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "test_util.h"

namespace kvtp {
namespace {

using test::run;

TEST(Cli, PplJsonIsOneObjectWithTheContractFields) {
  test::TempDir d;
  const auto r = run(test::kvtpBinary() + " ppl --model tests/fixtures/models/llama3-gqa --input-ids "
                     "tests/fixtures/models/llama3-gqa/input_ids.txt --json --logprobs " + (d / "lp.jsonl"));
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);  // throws if stdout is not exactly one JSON value
  for (const char* k : {"ppl", "nll", "tokens", "sequences", "seconds", "tokens_per_second"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["sequences"].size(), 3u);
  EXPECT_EQ(j["tokens"].get<int>(), 63 + 22 + 99);
  std::ifstream lp(d / "lp.jsonl");
  std::string line;
  int lines = 0, tokens = 0;
  while (std::getline(lp, line)) {
    tokens += int(nlohmann::json::parse(line)["logprobs"].size());
    ++lines;
  }
  EXPECT_EQ(lines, 3);
  EXPECT_EQ(tokens, j["tokens"].get<int>());
}

TEST(Cli, DecodeModeGivesThePrefillPerplexity) {
  const std::string base = test::kvtpBinary() + " ppl --model models/kvtp-opt-3m --data data/c4/c4-heldout-200.json.gz "
                           "--seq-len 200 --max-windows 2 --json --mode ";
  const auto p = run(base + "prefill"), dd = run(base + "decode");
  ASSERT_EQ(p.status, 0) << p.err;
  ASSERT_EQ(dd.status, 0) << dd.err;
  const double a = nlohmann::json::parse(p.out)["ppl"], b = nlohmann::json::parse(dd.out)["ppl"];
  EXPECT_NEAR(a, b, 1e-4 * a);  // fp32: the two paths sum in different orders
  EXPECT_EQ(nlohmann::json::parse(p.out)["tokens"], 2 * 199);
}

struct BadInput {
  std::string name, args, expect;
};
void PrintTo(const BadInput& b, std::ostream* os) { *os << b.args; }

class CliBadInput : public ::testing::TestWithParam<BadInput> {};

TEST_P(CliBadInput, OneClearLineAndNonZeroExit) {
  const auto r = run(test::kvtpBinary() + " ppl " + GetParam().args);
  EXPECT_NE(r.status, 0);
  EXPECT_TRUE(r.out.empty()) << r.out;
  EXPECT_NE(r.err.find(GetParam().expect), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("terminate called"), std::string::npos) << r.err;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CliBadInput,
    ::testing::Values(
        BadInput{"MissingModel", "--model /nonexistent --data data/c4/c4-heldout-200.json.gz", "does not exist"},
        BadInput{"MissingData", "--model models/kvtp-opt-3m --data /nonexistent.json.gz", "does not exist"},
        BadInput{"IdsNotNumbers", "--model models/kvtp-opt-3m --input-ids CMakeLists.txt", "is not a token id"},
        BadInput{"EmptyIds", "--model tests/fixtures/models/llama3-gqa --input-ids /dev/null", "holds no token ids"},
        BadInput{"UnknownMode", "--model models/kvtp-opt-3m --data data/c4/c4-heldout-200.json.gz --mode sideways", "sideways"},
        BadInput{"NoInput", "--model models/kvtp-opt-3m", "exactly one of --data and --input-ids"},
        BadInput{"NotAModelFolder", "--model tests/fixtures --data data/c4/c4-heldout-200.json.gz", "config.json"},
        BadInput{"KvNeedsDecode", "--model models/kvtp-opt-3m --data data/c4/c4-heldout-200.json.gz --kv h2o:budget=0.2 "
                 "--mode prefill", "use --mode decode"},
        BadInput{"UnknownKvMethod", "--model models/kvtp-opt-3m --data data/c4/c4-heldout-200.json.gz --kv lru", "lru"},
        BadInput{"BatchNeedsDecodeOnCuda", "--model models/kvtp-opt-3m --data data/c4/c4-heldout-200.json.gz --mode decode "
                 "--batch 4", "needs --mode decode and --device cuda"},
        BadInput{"HalfPrecisionOnCpu", "--model models/kvtp-opt-3m --data data/c4/c4-heldout-200.json.gz --dtype fp16",
                 "need --device cuda"},
        // CI has no GPU: the build without CUDA says so, the CUDA build finds no device.
        BadInput{"CudaWithoutGpu", "--model models/kvtp-opt-3m --data data/c4/c4-heldout-200.json.gz --device cuda",
                 "--device cuda: "},
        BadInput{"QFiltersNotCalibrated",
                 "--model tests/fixtures/models/llama3-gqa --input-ids tests/fixtures/models/llama3-gqa/input_ids.txt "
                 "--mode decode --kv qfilters:budget=0.3",
                 "kvtp qfilters"},
        BadInput{"QFiltersOfAnotherModel", "--model tests/fixtures/models/llama2-tied --input-ids "
                 "tests/fixtures/models/llama2-tied/input_ids.txt --mode decode "
                 "--kv qfilters:budget=0.3,filters=tests/data/llama3-gqa-qfilters.json", "not this model's"},
        BadInput{"UnknownPreset", "--synthetic opt-9000b --input-ids tests/fixtures/models/opt-preln/input_ids.txt", "preset"}),
    [](const auto& info) { return info.param.name; });

// `kvtp qfilters` writes filters that `--kv qfilters` reads from the model's folder, and the
// eviction they steer changes the log-probs.
TEST(Cli, QFiltersCalibratedByTheCommandSteerTheEviction) {
  test::TempDir d;
  const std::string src = "tests/fixtures/models/llama3-gqa", model = d / "model";
  std::filesystem::create_directory(model);
  for (const char* f : {"config.json", "model.safetensors"}) std::filesystem::copy_file(src + "/" + f, model + "/" + f);
  const std::string ids = " --input-ids " + src + "/input_ids.txt";
  const auto cal = run(test::kvtpBinary() + " qfilters --model " + model + ids);
  ASSERT_EQ(cal.status, 0) << cal.err;
  EXPECT_NE(cal.out.find("2 layers x 2 KV heads from 3 windows"), std::string::npos) << cal.out;
  const std::string ppl = test::kvtpBinary() + " ppl --model " + model + ids + " --mode decode --json";
  const auto full = run(ppl), kept = run(ppl + " --kv qfilters:budget=0.3");
  ASSERT_EQ(kept.status, 0) << kept.err;
  EXPECT_NE(nlohmann::json::parse(kept.out)["ppl"].get<double>(), nlohmann::json::parse(full.out)["ppl"].get<double>());
}

TEST(Cli, TokenIdBeyondVocabularyIsAnError) {
  test::TempDir d;
  std::ofstream(d / "ids.txt") << "1 2 999999\n";
  const auto r = run(test::kvtpBinary() + " ppl --model tests/fixtures/models/opt-preln --input-ids " + (d / "ids.txt"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("outside the vocabulary"), std::string::npos) << r.err;
}

// A sweep's CSV as a notebook reads it: Python's csv module gets the eleven columns of every row,
// the specs with commas whole (RFC 4180 quoting), and the plot is drawn from it.
TEST(Cli, SweepCsvRoundTripsThroughACsvReader) {
  test::TempDir d;
  const auto r = run(test::kvtpBinary() + " sweep --model models/kvtp-llama-2m --data data/c4/c4-heldout-200.json.gz "
                     "--seq-len 96 --max-windows 1 --methods h2o --budgets 0.5 --quants 'kivi:bits=2,residual=32' "
                     "--extra 'streamingllm:budget=0.5,sinks=2|int8' --ladder fp16/int4 --out " + (d / "s"));
  ASSERT_EQ(r.status, 0) << r.err;
  const auto read = run("/usr/bin/python3 -c 'import csv, json, sys; print(json.dumps(list(csv.reader(open(sys.argv[1])))))' " +
                        (d / "s.csv"));
  ASSERT_EQ(read.status, 0) << read.err;
  const auto rows = nlohmann::json::parse(read.out);
  ASSERT_EQ(rows.size(), 6u);  // header, full, h2o, h2o tiered, kivi, the combination
  EXPECT_EQ(rows[0][3], "ppl");
  for (const auto& row : rows) EXPECT_EQ(row.size(), 11u) << row.dump();
  EXPECT_EQ(rows[3][0], "h2o tiered");
  EXPECT_EQ(rows[3][1], "h2o:budget=0.5,ladder=fp16/int4");
  EXPECT_EQ(rows[4][0], "kivi:bits=2,residual=32");
  EXPECT_EQ(rows[4][2], "kivi:bits=2,residual=32");
  EXPECT_EQ(rows[5][0], "streamingllm:budget=0.5,sinks=2 + int8");
  EXPECT_EQ(rows[5][1], "streamingllm:budget=0.5,sinks=2");
  EXPECT_EQ(rows[5][2], "int8");
  for (size_t i = 1; i < rows.size(); ++i) {
    EXPECT_GT(std::stod(rows[i][3].get<std::string>()), 1.0) << rows[i].dump();  // ppl where it belongs
    EXPECT_GT(std::stoll(rows[i][4].get<std::string>()), 0) << rows[i].dump();   // tokens
  }
  if (run("which gnuplot").status == 0) EXPECT_GT(std::filesystem::file_size(d / "s.png"), 1000u) << r.out;
}

}  // namespace
}  // namespace kvtp
