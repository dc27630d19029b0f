// Small helpers the benchmark programs share.
#ifndef MUONPS_BENCH_BENCH_UTIL_H_
#define MUONPS_BENCH_BENCH_UTIL_H_

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace muonps {

// Median of `v` (the mean of the middle two for an even count); v non-empty.
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t mid = v.size() / 2;
  return v.size() % 2 == 1 ? v[mid] : 0.5 * (v[mid - 1] + v[mid]);
}

// Prints "PROGRAM: WHAT" to stderr and exits with status 1.
[[noreturn]] inline void Die(const char* program, const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", program, what.c_str());
  std::exit(1);
}

// The whole file at `path` ("" when unreadable).
inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The last `bytes` of `text`.
inline std::string Tail(const std::string& text, size_t bytes) {
  return text.size() <= bytes ? text : text.substr(text.size() - bytes);
}

// Starts argv[0] with arguments argv[1..], stdout and stderr into files;
// its pid, or -1 when fork fails.
inline pid_t StartProcess(const std::vector<std::string>& argv, const std::string& out,
                          const std::string& err) {
  std::vector<std::string> copy = argv;
  std::vector<char*> args;
  args.reserve(copy.size() + 1);
  for (std::string& a : copy) args.push_back(a.data());
  args.push_back(nullptr);
  const pid_t pid = fork();
  if (pid != 0) return pid;
  const int out_fd = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  const int err_fd = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (out_fd < 0 || err_fd < 0) _exit(126);
  dup2(out_fd, 1);
  dup2(err_fd, 2);
  close(out_fd);
  close(err_fd);
  execv(args[0], args.data());
  _exit(127);
}

// Waits for `pid`: its exit status, or 128 + the signal that ended it.
inline int WaitProcess(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace muonps

#endif  // MUONPS_BENCH_BENCH_UTIL_H_
