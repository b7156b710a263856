// PyTorch checkpoints (runtime/torch_checkpoint.h): archives built here byte by byte (a pickle as
// torch.save writes a state_dict, its storages beside it) for each rule and each hostile file;
// the fixtures' PyTorch copies (scripts/make_fixtures.py --torch-copies, transformers'
// save_pretrained(safe_serialization=False)) against their safetensors originals; and a fuzz loop
// over mutated archives that must end in an error or a load, never a crash.
#include <gtest/gtest.h>
#include <zip.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "runtime/error.h"
#include "runtime/model.h"
#include "runtime/perplexity.h"
#include "runtime/safetensors.h"
#include "runtime/torch_checkpoint.h"
#include "test_util.h"

namespace kvtp {
namespace {
namespace fs = std::filesystem;

// Pickle pieces, protocol 2 as torch.save writes them.
std::string str(const std::string& s) {
  const uint32_t n = uint32_t(s.size());
  return "X" + std::string(reinterpret_cast<const char*>(&n), 4) + s;
}
std::string global(const std::string& module, const std::string& name) { return "c" + module + "\n" + name + "\n"; }
std::string small(int v) { return "K" + std::string(1, char(v)); }
std::string tuple(const std::vector<int>& v) {
  std::string s = "(";
  for (int x : v) s += small(x);
  return s + "t";
}
// One entry of the state_dict: name -> a tensor of `storage` (key) viewed at offset, size, stride.
std::string tensor(const std::string& name, const std::string& storage_type, const std::string& key, int numel,
                   int offset, const std::vector<int>& size, const std::vector<int>& stride) {
  return str(name) + global("torch._utils", "_rebuild_tensor_v2") + "(" + "(" + str("storage") +
         global("torch", storage_type) + str(key) + str("cpu") + small(numel) + "tQ" + small(offset) + tuple(size) +
         tuple(stride) + "\x89" + global("collections", "OrderedDict") + ")R" + "tR";
}
std::string stateDict(const std::string& entries) {
  return "\x80\x02" + global("collections", "OrderedDict") + ")R(" + entries + "u.";
}

// A zip archive as torch.save writes one: archive/data.pkl, then each storage stored as it is.
void writeArchive(const std::string& path, const std::string& pickle,
                  const std::vector<std::pair<std::string, std::string>>& storages) {
  zipFile z = zipOpen64(path.c_str(), APPEND_STATUS_CREATE);
  ASSERT_NE(z, nullptr);
  auto add = [&](const std::string& name, const std::string& bytes) {
    ASSERT_EQ(zipOpenNewFileInZip64(z, name.c_str(), nullptr, nullptr, 0, nullptr, 0, nullptr, 0, 0, 0), ZIP_OK);
    ASSERT_EQ(zipWriteInFileInZip(z, bytes.data(), unsigned(bytes.size())), ZIP_OK);
    zipCloseFileInZip(z);
  };
  add("archive/data.pkl", pickle);
  for (auto& [key, bytes] : storages) add("archive/data/" + key, bytes);
  zipClose(z, nullptr);
}

std::string floats(const std::vector<float>& v) { return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4); }

using test::errorOf;

TEST(TorchCheckpoint, ReadsAStateDictWithSharedStorages) {
  test::TempDir d;
  // "a" is the whole storage; "b" a view of its second half (tied weights share a storage the
  // same way); "c" half precision; "ids" an integer buffer kvtp never reads.
  const uint16_t h[2] = {floatToHalf(1.5f), floatToHalf(-2.0f)};
  writeArchive(d / "pytorch_model.bin",
               stateDict(tensor("a", "FloatStorage", "0", 4, 0, {2, 2}, {2, 1}) +
                         tensor("b", "FloatStorage", "0", 4, 2, {2}, {1}) + tensor("c", "HalfStorage", "1", 2, 0, {2}, {1}) +
                         tensor("ids", "LongStorage", "2", 1, 0, {1}, {1})),
               {{"0", floats({1, 2, 3, 4})}, {"1", std::string(reinterpret_cast<const char*>(h), 4)}, {"2", std::string(8, '\0')}});
  Checkpoint ck(d.path.string());
  EXPECT_EQ(ck.read("a", {2, 2}), (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(ck.read("a", {2, 2}, {1, 1, 2}), (std::vector<float>{2, 4}));  // a column slice
  EXPECT_EQ(ck.read("b", {2}), (std::vector<float>{3, 4}));
  EXPECT_EQ(ck.read("c", {2}), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_FALSE(ck.has("ids"));
  EXPECT_EQ(ck.info("c").dtype, DType::F16);
}

TEST(TorchCheckpoint, HostileFilesGetClearErrors) {
  test::TempDir d;
  const auto load = [&](const std::string& pickle, const std::vector<std::pair<std::string, std::string>>& storages) {
    fs::remove(d / "pytorch_model.bin");
    writeArchive(d / "pytorch_model.bin", pickle, storages);
    return errorOf([&] { Checkpoint ck(d.path.string()); });
  };
  const auto data = std::vector<std::pair<std::string, std::string>>{{"0", floats({1, 2, 3, 4})}};
  // A pickle that names os.system, as a malicious checkpoint would: refused when named.
  EXPECT_HAS(load("\x80\x02" + global("os", "system") + "(" + str("touch " + (d / "pwned")) + "tR.", {}),
             "the global 'os.system'");
  EXPECT_FALSE(fs::exists(d / "pwned"));
  EXPECT_HAS(load("\x80\x02" + global("builtins", "eval") + "(" + str("1") + "tR.", {}), "refused");
  // Sizes past the storage's end, a storage the archive lacks, strides that are not row-major.
  EXPECT_HAS(load(stateDict(tensor("a", "FloatStorage", "0", 4, 0, {8}, {1})), data), "past the end of its storage");
  EXPECT_HAS(load(stateDict(tensor("a", "FloatStorage", "0", 4, 3, {2}, {1})), data), "past the end of its storage");
  EXPECT_HAS(load(stateDict(tensor("a", "FloatStorage", "9", 4, 0, {4}, {1})), data), "which the archive lacks");
  EXPECT_HAS(load(stateDict(tensor("a", "FloatStorage", "0", 4, 0, {2, 2}, {1, 2})), data), "is not contiguous");
  // Opcodes a state_dict never needs (BUILD of an object: INST 'i'), a pickle cut short.
  EXPECT_HAS(load("\x80\x02i__main__\nX\n.", {}), "refused");
  EXPECT_HAS(load(stateDict(tensor("a", "FloatStorage", "0", 4, 0, {4}, {1})).substr(0, 40), data), "truncated");
  // Not a zip archive (a legacy torch.save or any other file), and a truncated archive.
  std::ofstream(d / "pytorch_model.bin") << "pickle";
  EXPECT_HAS(errorOf([&] { Checkpoint ck(d.path.string()); }), "is not a zip archive");
  writeArchive(d / "whole.bin", stateDict(tensor("a", "FloatStorage", "0", 4, 0, {4}, {1})), data);
  fs::resize_file(d / "whole.bin", fs::file_size(d / "whole.bin") / 2);
  fs::rename(d / "whole.bin", d / "pytorch_model.bin");
  EXPECT_NE(errorOf([&] { Checkpoint ck(d.path.string()); }), "(no error)");
}

// Every byte of a real archive flipped at random, 400 times: each load ends in an error or a
// checkpoint whose tensors read within their storages; none crashes (ASan-free CI relies on
// the bounds checks; a crash here fails the test binary).
TEST(TorchCheckpoint, MutatedArchivesNeverCrash) {
  test::TempDir d;
  writeArchive(d / "good.bin",
               stateDict(tensor("a", "FloatStorage", "0", 4, 0, {2, 2}, {2, 1}) + tensor("b", "FloatStorage", "0", 4, 1, {3}, {1})),
               {{"0", floats({1, 2, 3, 4})}});
  std::ifstream in(d / "good.bin", std::ios::binary);
  const std::string good((std::istreambuf_iterator<char>(in)), {});
  std::mt19937 rng(11);
  int loaded = 0;
  for (int trial = 0; trial < 400; ++trial) {
    std::string bytes = good;
    for (int k = 0, n = 1 + int(rng() % 4); k < n; ++k) bytes[rng() % bytes.size()] = char(rng());
    std::ofstream(d / "pytorch_model.bin", std::ios::binary | std::ios::trunc) << bytes;
    try {
      Checkpoint ck(d.path.string());
      for (const auto& name : ck.names()) {
        const auto& t = ck.info(name);
        ck.read(name, t.shape);
      }
      ++loaded;
    } catch (const Error&) {
    }
  }
  std::printf("mutated archives: %d of 400 still loaded\n", loaded);
}

// The fixtures' PyTorch copies: the same tensors bit for bit and the same log-probs as the
// safetensors originals, and at tp 4 each rank reads the same bytes of the sharded one.
class TorchCopies : public ::testing::TestWithParam<std::string> {};

TEST_P(TorchCopies, GiveTheSafetensorsLogprobs) {
  const std::string st = test::fixture("models/" + GetParam()), bin = test::fixture("torch/" + GetParam());
  if (!fs::exists(bin)) GTEST_SKIP() << bin << " not made (scripts/make_fixtures.py --torch-copies)";
  bool has_bin = false;
  for (auto& f : fs::directory_iterator(bin)) has_bin |= f.path().extension() == ".bin";
  ASSERT_TRUE(has_bin) << bin;
  Checkpoint a(st), b(bin);
  for (const auto& name : a.names()) {
    if (!b.has(name)) {  // transformers drops a tied head from the pickles
      EXPECT_NE(name.find("lm_head"), std::string::npos) << name;
      continue;
    }
    const auto& t = a.info(name);
    EXPECT_EQ(b.info(name).dtype, t.dtype) << name;
    EXPECT_EQ(b.read(name, t.shape), a.read(name, t.shape)) << name;
  }
  const auto r = test::run(test::kvtpBinary() + " ppl --model " + bin + " --input-ids " + st + "/input_ids.txt --json --quiet");
  const auto s = test::run(test::kvtpBinary() + " ppl --model " + st + " --input-ids " + st + "/input_ids.txt --json --quiet");
  ASSERT_EQ(r.status, 0) << r.err;
  ASSERT_EQ(s.status, 0) << s.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["ppl"], nlohmann::json::parse(s.out)["ppl"]);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TorchCopies,
                         ::testing::Values("opt-preln", "opt-postln-proj", "llama3-gqa", "llama2-tied",
                                           "llama-sharded-bf16"),
                         [](const auto& info) { return test::paramName(info.param); });

}  // namespace
}  // namespace kvtp
