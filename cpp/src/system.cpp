#include "gradchain/system.hpp"

#include <pthread.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "gradchain/blas.hpp"
#include "gradchain/common.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gradchain {

VectorIsa cpu_vector_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const VectorIsa v = [] {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return VectorIsa::none;
    return __builtin_cpu_supports("avx512f") ? VectorIsa::avx512 : VectorIsa::avx2;
  }();
  return v;
#else
  return VectorIsa::none;
#endif
}

namespace {

std::int64_t now_ns() {
#ifdef CLOCK_MONOTONIC_COARSE
  // A few nanoseconds per read, so that every layer may poll; its ticks of a few
  // milliseconds are fine next to the 20 ms between looks at the hook.
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return std::int64_t(ts.tv_sec) * 1'000'000'000 + std::int64_t(ts.tv_nsec);
#else
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
#endif
}

}  // namespace

Canceller::Canceller(std::function<bool()> hook)
    : hook_(std::move(hook)), owner_(std::this_thread::get_id()), last_ns_(now_ns()) {}

void Canceller::poll() {
  if (stopped_.load(std::memory_order_relaxed)) throw Interrupted();
  if (!hook_ || std::this_thread::get_id() != owner_) return;
  const std::int64_t now = now_ns();
  if (now - last_ns_ < 20'000'000) return;
  last_ns_ = now;
  if (hook_()) {
    stopped_.store(true);
    throw Interrupted();
  }
}

// ---- memory ---------------------------------------------------------------------------

namespace {

constexpr double kGiB = 1073741824.0;
// Below this a request is not worth reading the limits for (unless a limit is forced).
constexpr double kUncheckedBytes = 16.0 * 1024 * 1024;
// Limit files hold about 2^63 for "no limit".
constexpr double kNoLimit = 4.0e18;
const char* const kLimitVariable = "GRADCHAIN_MEMORY_LIMIT";

bool read_file(const std::string& path, std::string& out) {
  std::ifstream f(path);
  if (!f) return false;
  std::ostringstream ss;
  ss << f.rdbuf();
  out = ss.str();
  return true;
}

// The number after `key` at the start of a line ("MemAvailable:   9718408 kB"); -1 if none.
double field(const std::string& text, const std::string& key) {
  for (std::size_t pos = 0; pos < text.size();) {
    std::size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    if (text.compare(pos, key.size(), key) == 0) {
      std::size_t i = pos + key.size();
      if (i < eol && (text[i] == ':' || text[i] == ' ' || text[i] == '\t')) {
        while (i < eol && (text[i] == ':' || text[i] == ' ' || text[i] == '\t')) ++i;
        const std::string rest = text.substr(i, eol - i);
        char* end = nullptr;
        const double v = std::strtod(rest.c_str(), &end);
        if (end != rest.c_str()) return v;
      }
    }
    pos = eol + 1;
  }
  return -1.0;
}

// A one-number file (a cgroup limit or usage); -1 for "max", a missing file or no number.
double number_in(const std::string& path) {
  std::string s;
  if (!read_file(path, s)) return -1.0;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  return end != s.c_str() && v >= 0 ? v : -1.0;
}

std::string gib(double bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3g GiB", bytes / kGiB);
  return buf;
}

std::string whole(double bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.0f", bytes);
  return buf;
}

void consider(MemoryLimit& m, double bytes, const std::string& source) {
  if (bytes < m.bytes) {
    m.bytes = std::max(bytes, 0.0);
    m.source = source;
  }
}

void consider_cgroup(MemoryLimit& m, double limit, double used, const std::string& file) {
  if (limit < 0 || limit >= kNoLimit) return;
  consider(m, limit - std::max(used, 0.0),
           "the " + gib(limit - std::max(used, 0.0)) + " left under the cgroup memory limit of " +
               gib(limit) + " (" + file + ", " + gib(std::max(used, 0.0)) + " in use)");
}

// Every directory from top + rel up to top.
std::vector<std::string> up_from(const std::string& top, std::string rel) {
  std::vector<std::string> dirs;
  while (!rel.empty() && rel.back() == '/') rel.pop_back();
  for (;;) {
    dirs.push_back(top + rel);
    if (rel.empty()) break;
    rel.erase(rel.rfind('/'));
  }
  return dirs;
}

// cgroup v2: memory.max of this process's group and of every group above it (the group's
// path in /proc/self/cgroup may not exist below the mount point inside a container; then
// the mount point is the group).
void cgroup_v2(MemoryLimit& m, const std::string& root, const std::string& rel) {
  for (const char* mount : {"/sys/fs/cgroup", "/sys/fs/cgroup/unified"}) {
    for (const std::string& dir : up_from(root + mount, rel)) {
      const double limit = number_in(dir + "/memory.max");
      if (limit < 0) continue;
      double used = number_in(dir + "/memory.current");
      std::string stat;
      if (read_file(dir + "/memory.stat", stat))
        used -= std::max(field(stat, "inactive_file"), 0.0);
      consider_cgroup(m, limit, used, dir.substr(root.size()) + "/memory.max");
    }
  }
}

// cgroup v1: the group's memory.stat has the least limit on the way up.
void cgroup_v1(MemoryLimit& m, const std::string& root, const std::string& rel) {
  const std::string mount = "/sys/fs/cgroup/memory";
  for (const std::string& dir : up_from(root + mount, rel)) {
    double limit = number_in(dir + "/memory.limit_in_bytes");
    if (limit < 0) continue;
    std::string stat;
    double used = number_in(dir + "/memory.usage_in_bytes");
    if (read_file(dir + "/memory.stat", stat)) {
      const double h = field(stat, "hierarchical_memory_limit");
      if (h >= 0) limit = std::min(limit, h);
      used -= std::max(field(stat, "total_inactive_file"), 0.0);
    }
    consider_cgroup(m, limit, used, dir.substr(root.size()) + "/memory.limit_in_bytes");
    return;  // the nearest group that exists has them all
  }
}

double forced_limit() {
  const char* v = std::getenv(kLimitVariable);
  if (!v || !*v) return -1.0;
  char* end = nullptr;
  const double b = std::strtod(v, &end);
  if (end == v || *end != '\0' || !(b >= 0) || !std::isfinite(b))
    throw std::invalid_argument(std::string(kLimitVariable) +
                                " must be a number of bytes (e.g. 1e9); got '" + v + "'");
  return b;
}

}  // namespace

std::uint64_t physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return 0;
  return static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page);
}

MemoryLimit memory_limit(const std::string& root) {
  MemoryLimit m;
  m.bytes = std::numeric_limits<double>::infinity();
  std::string meminfo;
  const bool have_meminfo = read_file(root + "/proc/meminfo", meminfo);
  const double total = have_meminfo ? field(meminfo, "MemTotal") * 1024.0 : -1.0;
  m.physical = total > 0 ? total : root.empty() ? double(physical_memory_bytes()) : 0.0;
  const double avail = have_meminfo ? field(meminfo, "MemAvailable") : -1.0;
  if (avail >= 0)
    consider(m, avail * 1024.0,
             "the " + gib(avail * 1024.0) +
                 " of memory available now (MemAvailable in /proc/meminfo; the machine has " +
                 gib(m.physical) + ")");
  else if (m.physical > 0)
    consider(m, m.physical, "the " + gib(m.physical) + " of memory this machine has");

  std::string groups;
  if (read_file(root + "/proc/self/cgroup", groups)) {
    std::istringstream lines(groups);
    for (std::string line; std::getline(lines, line);) {
      // id:controllers:path
      const std::size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
      if (b == std::string::npos) continue;
      const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
      if (line.compare(0, a, "0") == 0 && controllers.empty()) {
        cgroup_v2(m, root, path);
      } else {
        std::istringstream cs(controllers);
        for (std::string c; std::getline(cs, c, ',');)
          if (c == "memory") cgroup_v1(m, root, path);
      }
    }
  }

  const double forced = forced_limit();
  if (forced >= 0)
    consider(
        m, forced,
        "the " + whole(forced) + " bytes (" + gib(forced) + ") that " + kLimitVariable + " allows");
  return m;
}

void check_memory(double bytes, const std::string& what, double reusable) {
  const double need = bytes - std::max(reusable, 0.0);
  if (!(need > 0)) return;
  if (need < kUncheckedBytes && !std::getenv(kLimitVariable)) return;
  MemoryLimit lim = memory_limit();
  if (!(need > lim.bytes)) return;
  if (lim.physical > 0 && need > lim.physical &&
      lim.source.find(kLimitVariable) == std::string::npos)
    lim.source = "the " + gib(lim.physical) + " of memory this machine has";
  std::string msg = what + " needs " + whole(need) + " bytes (" + gib(need) + ")";
  if (reusable > 0) msg += " besides the " + whole(reusable) + " it holds already";
  throw MemoryRequestError(msg + ", more than " + lim.source);
}

bool memory_allows(double bytes, double factor) {
  const double need = bytes * factor;
  if (need < kUncheckedBytes && !std::getenv(kLimitVariable)) return true;
  return need <= memory_limit().bytes;
}

// ---- threads ----------------------------------------------------------------------------

namespace {

// Whether this thread has started an OpenMP team of two or more: libgomp then keeps a pool
// of threads for it, which a forked child does not have but still believes in.
thread_local bool t_made_team = false;
std::atomic<bool> g_single{false};

void after_fork_in_child() {
  if (t_made_team) g_single.store(true, std::memory_order_relaxed);
}

[[maybe_unused]] const int kForkHandler = pthread_atfork(nullptr, nullptr, after_fork_in_child);

}  // namespace

namespace {
thread_local int t_thread_limit = 0;
}  // namespace

int max_threads() {
  if (g_single.load(std::memory_order_relaxed)) return 1;
#ifdef _OPENMP
  const int n = omp_get_max_threads();
  return t_thread_limit > 0 && t_thread_limit < n ? t_thread_limit : n;
#else
  return 1;
#endif
}

int set_thread_limit(int n) {
  if (n < 0)
    throw std::invalid_argument("threads must be >= 0 (0: no limit); got " + std::to_string(n));
  const int old = t_thread_limit;
  t_thread_limit = n;
  return old;
}

int team_threads(int n) {
  if (n <= 1 || g_single.load(std::memory_order_relaxed)) return 1;
  t_made_team = true;
  return n;
}

bool forked_single_threaded() {
  return g_single.load(std::memory_order_relaxed);
}

int set_blas_threads(int n) {
  const int old = blas::get_num_threads();
  if (n != old) blas::set_num_threads(n);
  return old;
}

namespace {
std::mutex g_blas_mutex;
int g_blas_runs = 0;    // runs inside a BlasThreads guard
int g_blas_before = 0;  // the count the first of them found
int g_blas_count = 0;   // the count they run with
// A fork never lands inside the critical section: the child's copy of the mutex is free.
[[maybe_unused]] const int kBlasForkHandler = pthread_atfork(
    [] { g_blas_mutex.lock(); }, [] { g_blas_mutex.unlock(); }, [] { g_blas_mutex.unlock(); });
}  // namespace

BlasThreads::BlasThreads(int n) {
  const std::lock_guard<std::mutex> lock(g_blas_mutex);
  if (g_blas_runs == 0) {
    g_blas_before = set_blas_threads(n);
    g_blas_count = n;
  } else if (n != g_blas_count) {
    throw std::logic_error("gradchain: concurrent runs asked for different BLAS thread counts");
  }
  ++g_blas_runs;
}

BlasThreads::~BlasThreads() {
  const std::lock_guard<std::mutex> lock(g_blas_mutex);
  if (--g_blas_runs == 0) set_blas_threads(g_blas_before);
}

int blas_threads() {
  return g_single.load(std::memory_order_relaxed) ? 1 : blas::get_num_threads();
}

}  // namespace gradchain
