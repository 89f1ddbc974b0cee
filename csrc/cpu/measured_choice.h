// The per-shape choice between an op's candidate paths, measured once per process, the way cuDNN's
// benchmark mode and oneDNN's primitive cache decide: which of the package's kernels, oneDNN's
// units or one masked dense call per switch runs a layer fastest depends on the shape, the CPU and
// its libraries more than any fixed rule tuned on one machine can tell.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iomanip>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace paradis {

// A layer shape and everything else its paths' speed depends on, as numbers (cheap to build and
// compare on every call).
using ChoiceKey = std::vector<int64_t>;

// What was decided for one key: the candidates' names, their measured times (empty when forced or
// when there was one candidate), the winner, and the key in words.
struct Decision {
  std::vector<std::string> names;
  std::vector<double> ms;
  size_t chosen = 0;
  std::string forced_by;
  std::string what;
  uint64_t last_use = 0;  // when its key last ran (a count of calls)

  // "<path> (<why>) for <what>".
  std::string describe() const {
    std::ostringstream out;
    out << names[chosen];
    if (!forced_by.empty()) {
      out << " (forced by " << forced_by << ")";
    } else if (!ms.empty()) {
      out << " (measured on the first call:" << std::fixed << std::setprecision(3);
      for (size_t i = 0; i < names.size(); ++i) out << (i ? ", " : " ") << names[i] << " " << ms[i] << " ms";
      out << ")";
    } else {
      out << " (the only path)";
    }
    out << " for " << what;
    return out.str();
  }
};

class MeasuredChoices {
 public:
  // env names the environment variable that forces one of paths by name ("auto" or unset: measure).
  MeasuredChoices(const char* env, std::vector<std::string> paths) : env_(env), paths_(std::move(paths)) {}

  // Runs the candidate chosen for key and returns its result. On a key not seen, each candidate
  // runs once to warm caches and create oneDNN's primitives, then the candidates are timed in
  // turn, for up to kMaxRounds rounds while a round takes under kEnoughMs (short calls are the
  // noisy ones); the fastest time wins and that candidate's result is returned. Later calls run
  // the winner only: deterministic once chosen.
  // describe_key() says what the key is, in words (called once per decision).
  template <typename Result, typename Run, typename Describe>
  Result run(const ChoiceKey& key, const std::vector<std::string>& names, const Run& run_candidate,
             const Describe& describe_key) {
    const size_t forced = forced_index(names);
    if (names.size() == 1 || forced < names.size()) {
      const size_t only = names.size() == 1 ? 0 : forced;
      remember(key, Decision{names, {}, only, names.size() == 1 ? "" : env_, "", 0}, describe_key);
      return run_candidate(only);
    }
    if (const auto chosen = measured_before(key, names)) return run_candidate(*chosen);
    std::vector<Result> results;
    for (size_t i = 0; i < names.size(); ++i) results.push_back(run_candidate(i));
    std::vector<double> ms(names.size(), std::numeric_limits<double>::infinity());
    double round_ms = 0;
    for (int round = 0; round < kMaxRounds && round_ms < kEnoughMs; ++round) {
      round_ms = 0;
      for (size_t i = 0; i < names.size(); ++i) {
        const auto start = std::chrono::steady_clock::now();
        results[i] = run_candidate(i);
        const double took = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        ms[i] = std::min(ms[i], took);
        round_ms += took;
      }
    }
    size_t best = 0;
    for (size_t i = 1; i < names.size(); ++i)
      if (ms[i] < ms[best]) best = i;
    remember(key, Decision{names, ms, best, "", "", 0}, describe_key);
    return std::move(results[best]);
  }

  // The decisions of the keys seen, described one per line, the most recently run first.
  std::vector<std::string> describe() const {
    const std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::pair<uint64_t, std::string>> lines;
    for (const auto& entry : decisions_) lines.push_back({entry.second.last_use, entry.second.describe()});
    std::sort(lines.begin(), lines.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    std::vector<std::string> out;
    for (auto& line : lines) out.push_back(std::move(line.second));
    return out;
  }

 private:
  // The candidate the environment forces (names.size() when it forces none, or names a path that
  // is no candidate of this key); a name that is no path at all is an error.
  size_t forced_index(const std::vector<std::string>& names) const {
    const char* value = std::getenv(env_);
    if (!value || !*value || std::string(value) == "auto") return names.size();
    bool known = false;
    for (const auto& path : paths_) known = known || path == value;
    std::ostringstream all;
    for (const auto& path : paths_) all << path << ", ";
    TORCH_CHECK(known, env_, "=", value, " names no path; the paths are ", all.str(), "or auto");
    for (size_t i = 0; i < names.size(); ++i)
      if (names[i] == value) return i;
    return names.size();
  }

  // The candidate measured fastest for key with these candidates, marked used; none if not measured.
  // (The candidates run outside the lock: a candidate may call the op again, as relayout does.)
  std::optional<size_t> measured_before(const ChoiceKey& key, const std::vector<std::string>& names) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto found = decisions_.find(key);
    if (found == decisions_.end() || !found->second.forced_by.empty() || found->second.ms.empty() ||
        found->second.names != names)
      return std::nullopt;
    found->second.last_use = ++calls_;
    return found->second.chosen;
  }

  // Stores decision under key (its words built only when new or changed) and marks it used.
  template <typename Describe>
  void remember(const ChoiceKey& key, Decision decision, const Describe& describe_key) {
    const std::lock_guard<std::mutex> lock(mutex_);
    Decision& stored = decisions_[key];
    const bool same = stored.names == decision.names && stored.chosen == decision.chosen &&
                      stored.forced_by == decision.forced_by && stored.ms == decision.ms;
    if (!same) {
      decision.what = stored.what.empty() ? describe_key() : stored.what;
      stored = std::move(decision);
    }
    stored.last_use = ++calls_;
  }

  static constexpr int kMaxRounds = 3;
  static constexpr double kEnoughMs = 20.0;

  const char* env_;
  const std::vector<std::string> paths_;
  mutable std::mutex mutex_;
  std::map<ChoiceKey, Decision> decisions_;
  uint64_t calls_ = 0;
};

}  // namespace paradis
