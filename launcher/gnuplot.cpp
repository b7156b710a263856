#include "launcher/gnuplot.h"

#include <cstdlib>

namespace kvtp::launcher {

std::string gnuplotString(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

bool runGnuplot(const std::string& path) {
  std::string quoted;  // the path in single quotes for the shell, a quote inside as '\''
  for (char c : path) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return std::system(("gnuplot '" + quoted + "' 2>/dev/null").c_str()) == 0;
}

}  // namespace kvtp::launcher
