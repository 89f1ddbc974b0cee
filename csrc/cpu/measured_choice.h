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
  size_t inherited = 0;  // > 0: not measured, the winner of this many measured keys of its family
  std::string what;
  uint64_t last_use = 0;  // when its key last ran (a count of calls)

  // "<path> (<why>) for <what>".
  std::string describe() const {
    std::ostringstream out;
    out << names[chosen];
    if (!forced_by.empty()) {
      out << " (forced by " << forced_by << ")";
    } else if (inherited > 0) {
      out << " (the winner of the first " << inherited << " block tables measured for this layer shape)";
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
  // Keys that agree on their first family_length numbers are one family (a layer shape under
  // different block tables): once kFamilyMeasured of a family's keys are measured, its new keys
  // take the path that won most of them, unmeasured -- a universally slimmable network draws new
  // widths, so new block tables, every step, and measuring each would cost more than it saves.
  MeasuredChoices(const char* env, std::vector<std::string> paths, size_t family_length)
      : env_(env), paths_(std::move(paths)), family_length_(family_length) {}

  // Runs the candidate chosen for key and returns its result. On a key not seen, each candidate
  // runs once to warm caches and create oneDNN's primitives, then the candidates are timed in
  // turn, round after round while the rounds so far took under kEnoughMs, and for at least
  // kMinRounds rounds while they took under kPatienceMs (at most kMaxRounds): the fastest time of
  // each wins, so short calls, the noisy ones, get the most samples, and a preempted sample (a
  // busy neighbour) is outvoted -- on all but the largest layers, whose one round is enough.
  // That candidate's result is returned. Later calls run the winner only: deterministic once
  // chosen. describe_key() says what the key is, in words (called once per decision).
  template <typename Result, typename Run, typename Describe>
  Result run(const ChoiceKey& key, const std::vector<std::string>& names, const Run& run_candidate,
             const Describe& describe_key) {
    const size_t forced = forced_index(names);
    if (names.size() == 1 || forced < names.size()) {
      const size_t only = names.size() == 1 ? 0 : forced;
      remember(key, Decision{names, {}, only, names.size() == 1 ? "" : env_, 0, "", 0}, describe_key);
      return run_candidate(only);
    }
    if (const auto chosen = measured_before(key, names)) return run_candidate(*chosen);
    if (const auto [chosen, measured] = family_winner(key, names); measured > 0) {
      remember(key, Decision{names, {}, chosen, "", measured, "", 0}, describe_key);
      return run_candidate(chosen);
    }
    std::vector<Result> results;
    for (size_t i = 0; i < names.size(); ++i) results.push_back(run_candidate(i));
    std::vector<double> ms(names.size(), std::numeric_limits<double>::infinity());
    double total_ms = 0;
    for (int round = 0; round < kMaxRounds && (total_ms < kEnoughMs || (round < kMinRounds && total_ms < kPatienceMs));
         ++round) {
      for (size_t i = 0; i < names.size(); ++i) {
        const auto start = std::chrono::steady_clock::now();
        results[i] = run_candidate(i);
        const double took = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        ms[i] = std::min(ms[i], took);
        total_ms += took;
      }
    }
    size_t best = 0;
    for (size_t i = 1; i < names.size(); ++i)
      if (ms[i] < ms[best]) best = i;
    remember(key, Decision{names, ms, best, "", 0, "", 0}, describe_key);
    count_win(key, names[best]);
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
    if (found == decisions_.end() || !found->second.forced_by.empty() ||
        (found->second.ms.empty() && found->second.inherited == 0) || found->second.names != names)
      return std::nullopt;
    found->second.last_use = ++calls_;
    return found->second.chosen;
  }

  ChoiceKey family_of(const ChoiceKey& key) const {
    return ChoiceKey(key.begin(), key.begin() + std::min(family_length_, key.size()));
  }

  // The candidate that won most of the measured keys of key's family (the first of names on a tie)
  // and how many were measured; {0, 0} while fewer than kFamilyMeasured were, or none of the
  // winners is among names.
  std::pair<size_t, size_t> family_winner(const ChoiceKey& key, const std::vector<std::string>& names) const {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto found = families_.find(family_of(key));
    if (found == families_.end()) return {0, 0};
    size_t measured = 0, best = names.size(), best_wins = 0;
    for (const auto& [name, wins] : found->second) measured += wins;
    for (size_t i = 0; i < names.size(); ++i) {
      const auto wins = found->second.find(names[i]);
      if (wins != found->second.end() && wins->second > best_wins) best = i, best_wins = wins->second;
    }
    if (measured < kFamilyMeasured || best == names.size()) return {0, 0};
    return {best, measured};
  }

  void count_win(const ChoiceKey& key, const std::string& winner) {
    const std::lock_guard<std::mutex> lock(mutex_);
    ++families_[family_of(key)][winner];
  }

  // Stores decision under key (its words built only when new or changed) and marks it used.
  template <typename Describe>
  void remember(const ChoiceKey& key, Decision decision, const Describe& describe_key) {
    const std::lock_guard<std::mutex> lock(mutex_);
    Decision& stored = decisions_[key];
    const bool same = stored.names == decision.names && stored.chosen == decision.chosen &&
                      stored.forced_by == decision.forced_by && stored.ms == decision.ms &&
                      stored.inherited == decision.inherited;
    if (!same) {
      decision.what = stored.what.empty() ? describe_key() : stored.what;
      stored = std::move(decision);
    }
    stored.last_use = ++calls_;
  }

  static constexpr int kMaxRounds = 10;
  static constexpr int kMinRounds = 3;
  static constexpr double kEnoughMs = 30.0;
  static constexpr double kPatienceMs = 300.0;
  static constexpr size_t kFamilyMeasured = 4;

  const char* env_;
  const std::vector<std::string> paths_;
  const size_t family_length_;
  mutable std::mutex mutex_;
  std::map<ChoiceKey, Decision> decisions_;
  std::map<ChoiceKey, std::map<std::string, size_t>> families_;  // the wins of each family's measured keys
  uint64_t calls_ = 0;
};

}  // namespace paradis
