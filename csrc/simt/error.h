// simt::Error and the small helpers that format its messages.
#pragma once

#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#include <vector_types.h>

namespace simt {

// Everything the emulator diagnoses is thrown as simt::Error out of simt::launch (kernel code
// itself never throws; errors raised inside a fiber are carried out to the launching thread).
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error("simt: " + what) {}
};

namespace detail {

// A call site of a synchronizing primitive: caller's file, line and column.
struct Site {
  const char* file = "";
  int line = 0;
  int column = 0;
};

inline bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && a.column == b.column &&
         (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

inline std::string to_string(const Site& s) {
  const char* base = std::strrchr(s.file, '/');
  std::string out = std::string(base ? base + 1 : s.file) + ":" + std::to_string(s.line);
  return s.column ? out + ":" + std::to_string(s.column) : out;
}

inline std::string to_string(const uint3& v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

inline std::string to_string(const dim3& v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

inline std::string hex(unsigned v) {
  std::ostringstream os;
  os << "0x" << std::hex << v;
  return os.str();
}

}  // namespace detail
}  // namespace simt
