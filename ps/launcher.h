// Launches a local cluster as child processes (servers and workers; the
// scheduler runs in the launcher itself), forwards SIGINT/SIGTERM to the
// children, and when any child dies abnormally reports which one and how,
// then stops the rest.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

#include "core/status.h"

namespace zipwire::ps {

struct ChildSpec {
  std::string name;               // "worker 1", "server 0"
  std::vector<std::string> argv;  // argv[0] is the executable path
};

class Launcher {
 public:
  Launcher();
  ~Launcher();  // kills any child still running

  Status Spawn(const ChildSpec& spec);
  // Waits for every child. OK when all exit 0; otherwise the first failure,
  // naming the child and its exit code or signal, after the others were
  // stopped (SIGTERM, then SIGKILL after `grace`). A SIGINT/SIGTERM to the
  // launcher is forwarded and reported as kCancelled.
  Status WaitAll(std::chrono::milliseconds grace = std::chrono::milliseconds(3000));
  void KillAll(int signal);

 private:
  struct Child {
    std::string name;
    pid_t pid = -1;
    bool running = false;
    int status = 0;
  };
  // How long a first failure waits for the rest of its cascade before the
  // launcher blames one child (see WaitAll).
  static constexpr std::chrono::milliseconds kSettle{300};

  // waitpid(-1, WNOHANG): the child that exited (marked stopped), or null.
  Child* Reap(int* status);

  std::vector<Child> children_;
};

// The path of the running executable (/proc/self/exe).
std::string SelfExecutable();

}  // namespace zipwire::ps
