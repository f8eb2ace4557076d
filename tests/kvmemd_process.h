// A real kvmemd child process on a free loopback port, for end-to-end tests.
#ifndef KVMEM_TESTS_KVMEMD_PROCESS_H_
#define KVMEM_TESTS_KVMEMD_PROCESS_H_

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace kvmem::testing {

class KvmemdProcess {
 public:
  // Runs KVMEM_BIN_DIR/`binary` (kvmemd, or a build of it such as kvmemd_emu; the environment's
  // KVMEM_BIN_DIR and KVMEM_TEST_MODEL_DIR win over the build's) with `args` plus
  // "--listen 127.0.0.1:0" and the test model (unless `args` names --model), and waits until it
  // prints "kvmemd: listening on HOST:PORT". UNAVAILABLE with its stderr when it exits or stays
  // silent for 30 s.
  static absl::StatusOr<std::unique_ptr<KvmemdProcess>> Start(
      std::vector<std::string> args, const std::string& binary = "kvmemd") {
    bool has_model = false;
    for (const std::string& a : args) has_model |= a == "--model";
    // A GPU machine gets the binaries and the model elsewhere (scripts/gpu-check.sh says where).
    const char* model_dir = std::getenv("KVMEM_TEST_MODEL_DIR");
    const char* bin_dir = std::getenv("KVMEM_BIN_DIR");
    if (!has_model) {
      args.insert(args.begin(),
                  {"--model", model_dir != nullptr ? model_dir : KVMEM_TEST_MODEL_DIR});
    }
    args.insert(args.begin(),
                {std::string(bin_dir != nullptr ? bin_dir : KVMEM_BIN_DIR) + "/" + binary,
                 "--listen", "127.0.0.1:0"});
    auto process = std::unique_ptr<KvmemdProcess>(new KvmemdProcess());
    char stderr_template[] = "/tmp/kvmemd-stderr-XXXXXX";
    const int stderr_fd = mkstemp(stderr_template);
    process->stderr_path_ = stderr_template;
    int out[2];
    if (stderr_fd < 0 || pipe(out) != 0) return absl::InternalError("cannot create pipes");
    // Built before fork: the child of a multithreaded process may not allocate.
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t pid = fork();
    if (pid == 0) {
      dup2(out[1], STDOUT_FILENO);
      dup2(stderr_fd, STDERR_FILENO);
      close(out[0]);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(out[1]);
    close(stderr_fd);
    process->pid_ = pid;
    process->stdout_fd_ = out[0];
    // Read stdout until the "listening on" line.
    std::string text;
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    constexpr std::string_view kReady = "kvmemd: listening on ";
    auto ready = [&] {
      const size_t at = text.find(kReady);
      return at != std::string::npos && text.find('\n', at) != std::string::npos;
    };
    while (!ready()) {
      pollfd p{out[0], POLLIN, 0};
      const int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                            give_up - std::chrono::steady_clock::now())
                                            .count());
      char buf[256];
      ssize_t n = 0;
      if (left <= 0 || poll(&p, 1, left) <= 0 || (n = read(out[0], buf, sizeof(buf))) <= 0) {
        return absl::UnavailableError(
            absl::StrCat("kvmemd did not start; its stderr:\n", process->StderrText()));
      }
      text.append(buf, n);
    }
    const size_t begin = text.find(kReady) + kReady.size();
    process->address_ = text.substr(begin, text.find('\n', begin) - begin);
    return process;
  }

  ~KvmemdProcess() {
    if (pid_ > 0) Stop(SIGKILL);
    if (stdout_fd_ >= 0) close(stdout_fd_);
    std::error_code ec;
    std::filesystem::remove(stderr_path_, ec);
  }

  // "127.0.0.1:PORT".
  const std::string& address() const { return address_; }
  pid_t pid() const { return pid_; }

  // Sends `signal` and waits up to `timeout_ms` for the process to end (then SIGKILLs it).
  // Returns its exit code, or 128 + the signal that ended it, or -1 after the timeout.
  int Stop(int signal = SIGTERM, int timeout_ms = 20000) {
    if (pid_ <= 0) return exit_status_;
    kill(pid_, signal);
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    int status = 0;
    for (;;) {
      const pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) break;
      if (std::chrono::steady_clock::now() > give_up) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        pid_ = -1;
        return exit_status_ = -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    pid_ = -1;
    exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return exit_status_;
  }

  std::string StderrText() const {
    std::ifstream in(stderr_path_);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

 private:
  KvmemdProcess() = default;

  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  int exit_status_ = -1;
  std::string address_;
  std::string stderr_path_;
};

}  // namespace kvmem::testing

#endif  // KVMEM_TESTS_KVMEMD_PROCESS_H_
