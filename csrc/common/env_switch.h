// Launcher switches read from the environment: A/B switches between kernel variants (and other
// launch choices) that a benchmark flips per process until a measurement picks the default.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <initializer_list>
#include <string>

namespace kvcore {

// The index of $name's value in `choices`; choices.begin()[0] is the default, also when the
// variable is unset or empty. Any other value is an error naming the variable: a misspelt name
// must not silently run (and time) the default. Callers keep the result in a function-local
// static, so the variable is read once per process; a throwing first read leaves the static
// unset, so every later call raises again.
inline int env_choice(const char* name, std::initializer_list<const char*> choices, const char* op) {
  const char* e = std::getenv(name);
  const std::string value = e == nullptr ? "" : e;
  if (value.empty()) return 0;
  int index = 0;
  std::string listed;
  for (const char* c : choices) {
    if (value == c) return index;
    listed += (index ? ", '" : "'") + std::string(c) + "'";
    ++index;
  }
  TORCH_CHECK(false, op, ": ", name, " must be unset or one of ", listed, ", got '", value, "'");
}

}  // namespace kvcore
