// One exception type for everything a user can get wrong (bad files, shapes, options): the CLI
// prints its message on one line and exits non-zero; servers turn it into a status.
#pragma once
#include <stdexcept>
#include <string>

namespace kvtp {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// "[a, b, c]": shapes in error messages.
template <class Vec>
std::string shapeString(const Vec& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace kvtp

namespace kvtp {
// Thrown (on every rank at the same point) to stop a job that was cancelled.
struct Cancelled : Error {
  Cancelled() : Error("cancelled") {}
};
}  // namespace kvtp
