// Token ids against Hugging Face's tokenizers on a text with unicode, emoji, whitespace runs,
// digits and newlines (fixtures from scripts/make_fixtures.py).
#include <gtest/gtest.h>

#include "runtime/error.h"
#include "runtime/tokenizer.h"
#include "test_util.h"

namespace kvtp {
namespace {

class HfTokenizer : public ::testing::TestWithParam<std::string> {};

TEST_P(HfTokenizer, IdsEqualHuggingFace) {
  const std::string dir = test::fixture("tokenizers/" + GetParam());
  const auto ref = test::readJsonFile(dir + "/hf_ids.json");
  ASSERT_FALSE(ref.contains("hf_error")) << ref["hf_error"];
  const auto tok = loadTokenizer(dir);
  const std::string text = ref["text"];
  EXPECT_EQ(tok->encodeText(text), ref["ids_no_special"].get<std::vector<int>>());
  EXPECT_EQ(tok->encode(text), ref["ids"].get<std::vector<int>>()) << "BOS handling differs";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfTokenizer, ::testing::Values("gpt2-bpe", "llama3-json", "llama2-spm"),
                         [](const auto& info) { return test::paramName(info.param); });

TEST(Tokenizer, BpeFindsTheRightKind) {
  EXPECT_EQ(loadTokenizer(test::fixture("tokenizers/gpt2-bpe"))->kind(), "gpt2-bpe");
  EXPECT_EQ(loadTokenizer(test::fixture("tokenizers/llama3-json"))->kind(), "tokenizer.json-bpe");
  EXPECT_EQ(loadTokenizer(test::fixture("tokenizers/llama2-spm"))->kind(), "sentencepiece");
}

TEST(Tokenizer, SpecialTokenInTextIsOneId) {
  const auto tok = loadTokenizer(test::fixture("tokenizers/llama3-json"));
  const auto ids = tok->encodeText("a<|end_of_text|>b");
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[1], 1);
}

// Python's bytes.decode("utf-8", errors="replace") — what transformers' decode gives — replaces
// each maximal ill-formed subsequence by one U+FFFD: a truncated sequence is one, a byte that
// cannot start or continue one (or a first continuation out of its lead's range) is one each.
TEST(Tokenizer, InvalidUtf8IsReplacedAsPythonReplacesIt) {
  const std::string R = "\xEF\xBF\xBD";
  EXPECT_EQ(replaceInvalidUtf8("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80"), "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80");
  EXPECT_EQ(replaceInvalidUtf8("hed \xE2\x80 comple"), "hed " + R + " comple");  // truncated: one
  EXPECT_EQ(replaceInvalidUtf8("sp\xF1\xF1\xF1ox"), "sp" + R + R + R + "ox");
  EXPECT_EQ(replaceInvalidUtf8("find\xA0\xF1"), "find" + R + R);
  EXPECT_EQ(replaceInvalidUtf8("\xF0\x9F\x98"), R);                          // truncated at the end
  EXPECT_EQ(replaceInvalidUtf8("\xED\xA0\x80"), R + R + R);                  // a surrogate
  EXPECT_EQ(replaceInvalidUtf8("\xC0\xAF"), R + R);                           // overlong
  EXPECT_EQ(replaceInvalidUtf8("\xE0\x80\xAF"), R + R + R);                  // overlong
  EXPECT_EQ(replaceInvalidUtf8("\xF4\x90\x80\x80"), R + R + R + R);         // past U+10FFFF
  EXPECT_EQ(replaceInvalidUtf8(""), "");
}

TEST(Tokenizer, InvalidUtf8DoesNotThrow) {
  const auto tok = loadTokenizer(test::fixture("tokenizers/gpt2-bpe"));
  const std::string bad = "ok \xff\xfe broken \xc3";
  EXPECT_FALSE(tok->encodeText(bad).empty());
}

TEST(Tokenizer, MissingFolderIsAClearError) {
  test::TempDir d;
  try {
    loadTokenizer(d.path.string());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("has no tokenizer"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kvtp
