// A child process for end-to-end tests: started through /bin/sh in its own process group (so
// mpirun and everything under it can be signalled together), output to a log file, always
// killed when the object dies.
#pragma once
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

namespace kvtp::test {

class Process {
 public:
  Process(const std::string& command, const std::string& log_path) : log_(log_path) {
    pid_ = fork();
    if (pid_ == 0) {
      setpgid(0, 0);
      execl("/bin/sh", "sh", "-c", ("exec " + command + " >" + log_path + " 2>&1").c_str(), (char*)nullptr);
      _exit(127);
    }
    setpgid(pid_, pid_);
  }
  ~Process() {
    if (running()) signalGroup(SIGKILL);
    wait(std::chrono::seconds(10));
  }
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  void signalGroup(int sig) { ::kill(-pid_, sig); }
  bool running() {
    if (exited_) return false;
    int st;
    const pid_t r = waitpid(pid_, &st, WNOHANG);
    if (r == pid_) {
      exited_ = true;
      status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    return !exited_;
  }
  // Exit status, or -1 if still running after `limit`.
  int wait(std::chrono::milliseconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    while (running() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return running() ? -1 : status_;
  }
  std::string log() const {
    std::ifstream in(log_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  // Waits until the log contains `needle`; false after `limit`.
  bool waitForLog(const std::string& needle, std::chrono::milliseconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < until) {
      if (log().find(needle) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

 private:
  pid_t pid_ = -1;
  std::string log_;
  bool exited_ = false;
  int status_ = -1;
};

}  // namespace kvtp::test
