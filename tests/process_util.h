// Child processes for tests that run the muonps binary: start one with its
// output in a file, wait for it with a timeout, signal it, and never leave it
// running (the destructor kills it, and a child is SIGKILLed by the kernel
// when the test process dies).
#ifndef MUONPS_TESTS_PROCESS_UTIL_H_
#define MUONPS_TESTS_PROCESS_UTIL_H_

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace muonps::testing_util {

// Reads a whole file; "" when it cannot be read.
inline std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// One child process. Not thread-safe; owned by one test.
class ChildProcess {
 public:
  // Starts argv[0] (a path) with arguments argv[1..]. stdout goes to
  // `out_path` and stderr to `err_path` (the same file when equal; "" =
  // /dev/null). The child gets SIGKILL when the test process dies.
  // Returns a child that is not running (pid() < 0) when fork fails.
  // `env` ("NAME=VALUE") is added to this process's environment.
  ChildProcess(std::vector<std::string> argv, std::string out_path, std::string err_path,
               std::vector<std::string> env = {})
      : argv_(std::move(argv)),
        out_path_(std::move(out_path)),
        err_path_(std::move(err_path)),
        env_(std::move(env)) {
    // Everything the child needs is prepared before fork: between fork and
    // exec a child of a threaded process may only make async-signal-safe calls.
    std::vector<char*> args;
    for (std::string& a : argv_) args.push_back(a.data());
    args.push_back(nullptr);
    std::vector<char*> envp;
    for (char** e = environ; *e != nullptr; ++e) envp.push_back(*e);
    for (std::string& e : env_) envp.push_back(e.data());
    envp.push_back(nullptr);
    const char* out = out_path_.empty() ? "/dev/null" : out_path_.c_str();
    const char* err = err_path_.empty() ? "/dev/null" : err_path_.c_str();
    const bool same = out_path_ == err_path_;
    const pid_t parent = getpid();
    pid_ = fork();
    if (pid_ != 0) return;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(126);
    const int out_fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out_fd >= 0) dup2(out_fd, 1);
    const int err_fd = same ? out_fd : open(err, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (err_fd >= 0) dup2(err_fd, 2);
    if (out_fd > 2) close(out_fd);
    if (!same && err_fd > 2) close(err_fd);
    execve(args[0], args.data(), envp.data());
    _exit(127);
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess() { Kill(); }

  pid_t pid() const { return pid_; }
  const std::string& out_path() const { return out_path_; }
  const std::string& err_path() const { return err_path_; }
  // The command line, for messages.
  std::string command() const {
    std::string s;
    for (const std::string& a : argv_) s += (s.empty() ? "" : " ") + a;
    return s;
  }

  // Whether it has exited (reaped); the wait status is then in status().
  bool Exited() {
    Poll();
    return status_.has_value();
  }
  // The raw waitpid status once exited.
  std::optional<int> status() const { return status_; }

  // Waits up to `seconds` for the child to exit; its wait status, or nullopt
  // when it is still running.
  std::optional<int> Wait(double seconds) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
    while (!Exited() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return status_;
  }

  // Sends `signal` when still running.
  void Signal(int signal) {
    if (pid_ > 0 && !Exited()) kill(pid_, signal);
  }

  // SIGKILL and reap (no-op once exited).
  void Kill() {
    if (pid_ <= 0 || Exited()) return;
    kill(pid_, SIGKILL);
    int status = 0;
    if (waitpid(pid_, &status, 0) == pid_) status_ = status;
  }

 private:
  void Poll() {
    if (pid_ <= 0 || status_.has_value()) return;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) status_ = status;
  }

  std::vector<std::string> argv_;
  std::string out_path_, err_path_;
  std::vector<std::string> env_;
  pid_t pid_ = -1;
  std::optional<int> status_;
};

// The exit code of a wait status, or 128 + the signal that killed it.
inline int ExitCodeOf(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// Pids of the live processes (zombies excluded) whose command line contains
// `needle`, other than this process.
inline std::vector<pid_t> ProcessesMentioning(const std::string& needle) {
  std::vector<pid_t> found;
  DIR* proc = opendir("/proc");
  if (proc == nullptr) return found;
  while (dirent* entry = readdir(proc)) {
    const std::string name = entry->d_name;
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name));
    if (pid == getpid()) continue;
    std::string cmdline = ReadWholeFile("/proc/" + name + "/cmdline");
    for (char& c : cmdline) {
      if (c == '\0') c = ' ';
    }
    if (cmdline.find(needle) == std::string::npos) continue;
    // "State:\tZ (zombie)" in /proc/PID/status: exited, only not yet reaped.
    const std::string status = ReadWholeFile("/proc/" + name + "/status");
    if (status.find("State:\tZ") != std::string::npos) continue;
    found.push_back(pid);
  }
  closedir(proc);
  return found;
}

}  // namespace muonps::testing_util

#endif  // MUONPS_TESTS_PROCESS_UTIL_H_
