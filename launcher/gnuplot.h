// Plots through gnuplot (Debian's gnuplot-nox, pngcairo): what the sweep and passkey PNGs share.
#pragma once
#include <string>

namespace kvtp::launcher {

// A gnuplot single-quoted string: a quote inside is doubled.
std::string gnuplotString(const std::string& s);
// Runs gnuplot on the script at `path`; false where gnuplot failed or is missing.
bool runGnuplot(const std::string& path);

}  // namespace kvtp::launcher
