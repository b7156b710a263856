// Tokenizers of the supported families, loaded from a Hugging Face folder:
//  - tokenizer.model            SentencePiece (Llama 1/2), through libsentencepiece
//  - tokenizer.json             byte-level BPE (Llama 3), split regex read from the file
//  - vocab.json + merges.txt    GPT-2 byte-level BPE (OPT)
// BOS is added as the folder's tokenizer config says (add_bos_token / TemplateProcessing).
#pragma once
#include <memory>
#include <string>
#include <vector>

namespace kvtp {

// `s` with each maximal ill-formed subsequence (Unicode's "maximal subpart": a truncated or
// invalid UTF-8 sequence, overlong forms and surrogates included) replaced by U+FFFD — Python's
// bytes.decode("utf-8", errors="replace") and Rust's from_utf8_lossy (the byte-level decoders).
std::string replaceInvalidUtf8(const std::string& s);

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Ids of the text alone, no special tokens added.
  virtual std::vector<int> encodeText(const std::string& text) const = 0;
  virtual int vocabSize() const = 0;
  // The text of `ids` with special tokens (BOS, EOS, padding) left out, as transformers'
  // decode(ids, skip_special_tokens=True) gives it (without its clean_up_tokenization_spaces),
  // bytes that form no character replaced by U+FFFD as its decoders replace them.
  virtual std::string decode(const std::vector<int>& ids) const = 0;
  // The part of decode(ids) that more ids cannot change (a prefix of it): it ends before bytes
  // that may yet complete a character — what a stream can send.
  virtual std::string decodeSettled(const std::vector<int>& ids) const = 0;
  // Ids as the model's tokenizer gives them by default (BOS first when configured).
  std::vector<int> encode(const std::string& text) const;
  int bosId() const { return bos_id_; }
  bool addsBos() const { return add_bos_ && bos_id_ >= 0; }
  virtual std::string kind() const = 0;

 protected:
  int bos_id_ = -1;
  bool add_bos_ = false;
};

std::unique_ptr<Tokenizer> loadTokenizer(const std::string& model_dir);

}  // namespace kvtp
