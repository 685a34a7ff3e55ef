#include "ps/launcher.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <thread>

#include "core/log.h"

namespace zipwire::ps {

namespace {

std::atomic<int> g_forwarded_signal{0};

void OnSignal(int sig) { g_forwarded_signal.store(sig); }

std::string DescribeExit(int status) {
  if (WIFEXITED(status)) return "exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    return "was killed by signal " + std::to_string(sig) + " (" + strsignal(sig) + ")";
  }
  return "stopped with status " + std::to_string(status);
}

bool Failed(int status) { return !(WIFEXITED(status) && WEXITSTATUS(status) == 0); }

}  // namespace

std::string SelfExecutable() {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  buf[n] = '\0';
  return buf;
}

Launcher::Launcher() {
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

Launcher::~Launcher() { KillAll(SIGKILL); }

Status Launcher::Spawn(const ChildSpec& spec) {
  if (spec.argv.empty()) return InvalidArgument("empty command for " + spec.name);
  std::vector<char*> argv;
  for (const auto& a : spec.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = fork();
  if (pid < 0) return IoError(std::string("fork failed: ") + std::strerror(errno));
  if (pid == 0) {
    // The child dies with the launcher, so no orphan keeps a port busy.
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    execv(argv[0], argv.data());
    std::fprintf(stderr, "zipwire: cannot execute %s: %s\n", argv[0], std::strerror(errno));
    _exit(127);
  }
  children_.push_back(Child{spec.name, pid, true, 0});
  return Status::Ok();
}

void Launcher::KillAll(int signal) {
  for (auto& c : children_) {
    if (c.running) kill(c.pid, signal);
  }
  if (signal == SIGKILL) {
    for (auto& c : children_) {
      if (c.running) {
        waitpid(c.pid, &c.status, 0);
        c.running = false;
      }
    }
  }
}

Launcher::Child* Launcher::Reap(int* status) {
  pid_t pid = waitpid(-1, status, WNOHANG);
  if (pid <= 0) return nullptr;
  for (auto& c : children_) {
    if (c.pid != pid || !c.running) continue;
    c.running = false;
    c.status = *status;
    return &c;
  }
  return nullptr;  // not one of ours
}

Status Launcher::WaitAll(std::chrono::milliseconds grace) {
  Status first_failure;
  bool stopping = false;
  auto stop_deadline = std::chrono::steady_clock::time_point::max();
  auto running = [&] {
    for (auto& c : children_) {
      if (c.running) return true;
    }
    return false;
  };
  while (running()) {
    int sig = g_forwarded_signal.exchange(0);
    if (sig != 0) {
      ZW_LOG(kWarn, "launcher: got signal " << sig << ", forwarding to the cluster");
      KillAll(sig);
      if (first_failure.ok()) first_failure = Cancelled(std::string("interrupted by ") + strsignal(sig));
      if (!stopping) {
        stopping = true;
        stop_deadline = std::chrono::steady_clock::now() + grace;
      }
    }
    int status = 0;
    Child* exited = Reap(&status);
    if (exited != nullptr) {
      if (Failed(status) && !stopping) {
        // Failures cascade: a worker killed by a signal makes the server exit
        // with an error a moment later, and waitpid may report the two in
        // either order. Let the cascade settle briefly (nothing is signalled
        // yet) and blame the root cause: a child killed by a signal before
        // one that exited with an error code, else the first reaped.
        Child* cause = exited;
        const auto settle_until = std::chrono::steady_clock::now() + kSettle;
        while (std::chrono::steady_clock::now() < settle_until && running()) {
          int other_status = 0;
          Child* other = Reap(&other_status);
          if (other == nullptr) {
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
            continue;
          }
          if (Failed(other_status) && WIFSIGNALED(other_status) && !WIFSIGNALED(cause->status)) cause = other;
        }
        std::string what =
            cause->name + " (pid " + std::to_string(cause->pid) + ") " + DescribeExit(cause->status);
        std::fprintf(stderr, "zipwire: %s; stopping the rest of the cluster\n", what.c_str());
        if (first_failure.ok()) first_failure = Status(StatusCode::kPeerClosed, what);
        stopping = true;
        stop_deadline = std::chrono::steady_clock::now() + grace;
        KillAll(SIGTERM);
      }
      continue;
    }
    if (stopping && std::chrono::steady_clock::now() > stop_deadline) {
      KillAll(SIGKILL);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return first_failure;
}

}  // namespace zipwire::ps
