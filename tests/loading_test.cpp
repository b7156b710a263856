// Bad model folders get clear errors naming the file, the tensor, what was expected and found.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "runtime/config.h"
#include "runtime/error.h"
#include "runtime/model.h"
#include "runtime/safetensors.h"
#include "test_util.h"

namespace kvtp {
namespace {
namespace fs = std::filesystem;

// Writes a safetensors file with one F32 tensor per entry (values 0, 1, 2, ...).
void writeSafetensors(const std::string& path, const std::vector<std::pair<std::string, std::vector<int64_t>>>& tensors,
                      const std::string& dtype = "F32") {
  nlohmann::json header;
  std::string data;
  for (auto& [name, shape] : tensors) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    const size_t begin = data.size();
    for (int64_t i = 0; i < n; ++i) {
      float v = float(i);
      data.append(reinterpret_cast<const char*>(&v), 4);
    }
    header[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {begin, data.size()}}};
  }
  const std::string h = header.dump();
  const uint64_t len = h.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&len), 8);
  out << h << data;
}

using test::errorOf;

TEST(Safetensors, ReadsSlicesOfRowsAndColumns) {
  test::TempDir d;
  writeSafetensors(d / "m.safetensors", {{"w", {3, 4}}});
  SafetensorsFile f(d / "m.safetensors");
  ASSERT_NE(f.find("w"), nullptr);
  fs::create_directories(d.path / "ck");
  fs::copy(d / "m.safetensors", d / "ck/model.safetensors");
  Checkpoint ck(d / "ck");
  EXPECT_EQ(ck.read("w", {3, 4}, {0, 1, 3}), (std::vector<float>{4, 5, 6, 7, 8, 9, 10, 11}));
  EXPECT_EQ(ck.read("w", {3, 4}, {1, 2, 4}), (std::vector<float>{2, 3, 6, 7, 10, 11}));
  EXPECT_EQ(ck.bytesRead(), (8u + 6u) * 4u);
}

TEST(Safetensors, WrongShapeNamesTensorAndBothShapes) {
  test::TempDir d;
  writeSafetensors(d / "model.safetensors", {{"model.layers.3.self_attn.q_proj.weight", {96, 64}}});
  Checkpoint ck(d.path.string());
  const auto msg = errorOf([&] { ck.read("model.layers.3.self_attn.q_proj.weight", {96, 96}); });
  EXPECT_HAS(msg, "'model.layers.3.self_attn.q_proj.weight'");
  EXPECT_HAS(msg, "[96, 64]");
  EXPECT_HAS(msg, "expected [96, 96]");
}

TEST(Safetensors, TruncatedFileIsDetected) {
  test::TempDir d;
  writeSafetensors(d / "model.safetensors", {{"a", {100}}});
  fs::resize_file(d / "model.safetensors", fs::file_size(d / "model.safetensors") - 10);
  EXPECT_HAS(errorOf([&] { Checkpoint ck(d.path.string()); }), "outside the file");
  fs::resize_file(d / "model.safetensors", 5);
  EXPECT_HAS(errorOf([&] { Checkpoint ck(d.path.string()); }), "truncated");
}

TEST(Safetensors, CorruptHeaderIsDetected) {
  test::TempDir d;
  std::ofstream out(d / "model.safetensors", std::ios::binary);
  const uint64_t len = 12;
  out.write(reinterpret_cast<const char*>(&len), 8);
  out << "{not json!!}";
  out.close();
  EXPECT_HAS(errorOf([&] { Checkpoint ck(d.path.string()); }), "corrupt safetensors header");
}

TEST(Safetensors, UnsupportedDtypeIsNamed) {
  test::TempDir d;
  writeSafetensors(d / "model.safetensors", {{"a", {4}}}, "I32");
  EXPECT_HAS(errorOf([&] { Checkpoint ck(d.path.string()); }), "dtype I32");
}

TEST(Safetensors, MissingShardIsNamed) {
  test::TempDir d;
  std::ofstream(d / "model.safetensors.index.json") << R"({"weight_map": {"a": "model-00002-of-00002.safetensors"}})";
  EXPECT_HAS(errorOf([&] { Checkpoint ck(d.path.string()); }), "model-00002-of-00002.safetensors");
}

TEST(Safetensors, HalfConversionsRoundTrip) {
  for (float f : {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f, 0.333251953125f}) {
    EXPECT_EQ(halfToFloat(floatToHalf(f)), f) << f;
    EXPECT_EQ(bfloat16ToFloat(floatToBfloat16(f)), bfloat16ToFloat(floatToBfloat16(bfloat16ToFloat(floatToBfloat16(f)))));
  }
  EXPECT_EQ(bfloat16ToFloat(floatToBfloat16(1.0f)), 1.0f);
  EXPECT_EQ(halfToFloat(0x3C00), 1.0f);
  EXPECT_EQ(bfloat16ToFloat(0x3F80), 1.0f);
}

TEST(Config, UnknownModelTypeIsRejected) {
  test::TempDir d;
  std::ofstream(d / "config.json") << R"({"model_type": "gpt_neox", "vocab_size": 10})";
  EXPECT_HAS(errorOf([&] { loadConfig(d.path.string()); }), "model_type \"gpt_neox\" is not supported");
}

TEST(Config, MissingFieldIsNamed) {
  test::TempDir d;
  std::ofstream(d / "config.json") << R"({"model_type": "llama", "vocab_size": 10})";
  EXPECT_HAS(errorOf([&] { loadConfig(d.path.string()); }), "missing \"hidden_size\"");
}

TEST(Config, ReadsTransformers4And5RopeSettings) {
  nlohmann::json j = test::readJsonFile(test::fixture("models/llama3-gqa/config.json"));
  const auto v5 = parseConfig(j, "v5");
  EXPECT_EQ(v5.rope.type, "llama3");
  EXPECT_EQ(v5.rope.original_max_positions, 64);
  j["rope_scaling"] = j["rope_parameters"];
  j["rope_scaling"].erase("rope_theta");
  j["rope_theta"] = 10000.0;
  j.erase("rope_parameters");
  const auto v4 = parseConfig(j, "v4");
  EXPECT_EQ(v4.rope.type, "llama3");
  EXPECT_EQ(v4.rope.factor, 8.0);
  EXPECT_EQ(ropeInverseFrequencies(v4), ropeInverseFrequencies(v5));
}

TEST(Model, MissingTensorNamesIt) {
  test::TempDir d;
  fs::copy(test::fixture("models/opt-preln/config.json"), d / "config.json");
  writeSafetensors(d / "model.safetensors", {{"model.decoder.embed_tokens.weight", {1000, 64}}});
  EXPECT_HAS(errorOf([&] { Model::load(d.path.string()); }), "model.decoder.embed_positions.weight' is missing");
}

TEST(Model, TokenOutsideVocabularyIsAnError) {
  auto m = Model::load(test::fixture("models/llama2-tied"));
  auto cache = m->newCache();
  int tok = 5000, pos = 0;
  EXPECT_HAS(errorOf([&] { m->forward(&tok, &pos, 1, cache); }), "outside the vocabulary");
}

}  // namespace
}  // namespace kvtp
