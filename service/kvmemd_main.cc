// `kvmemd`: the kvmem gRPC server. See KvmemdUsage() (kvmemd --help) for its flags.
//
// Start-up: flags -> model -> backend -> SessionManager -> workers -> gRPC server (AgentMemory,
// health, reflection). Once listening it prints "kvmemd: listening on HOST:PORT" on stdout.
// SIGTERM/SIGINT: health turns NOT_SERVING, the server stops accepting calls, in-flight calls
// get --shutdown-grace-ms to finish and are cancelled after that (a cancelled generation keeps
// nothing), the workers drain, the SessionManager closes (flushing its store), exit 0.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/cpu_backend.h"
#include "engine/cuda_backend.h"
#include "engine/malloc_arenas.h"
#include "engine/model.h"
#include "service/agent_memory_service.h"
#include "service/auth_tokens.h"
#include "service/server_flags.h"
#include "service/session_manager.h"
#include "service/worker_pool.h"

namespace kvmem {
namespace {

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "kvmemd: %s: %s\n", absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str());
  return 1;
}

// "HOST:PORT" with the port gRPC actually bound (differs from `listen` for port 0).
std::string BoundAddress(const std::string& listen, int port) {
  const size_t colon = listen.rfind(':');
  return absl::StrCat(colon == std::string::npos ? listen : listen.substr(0, colon), ":", port);
}

// --device cuda: the GPU or an error saying why not. auto: the GPU when one is usable, else
// the CPU, saying so in the log (a GPU that is present but fails, e.g. out of memory for the
// weights, is an error rather than a silent fall back to a far slower backend).
absl::StatusOr<std::unique_ptr<Backend>> SelectBackend(const KvmemdOptions& options,
                                                       const Model& model, DeviceDtype dtype) {
  if (options.device != "cpu") {
    const int64_t warm = options.sessions.warm_bytes;
    const int64_t pinned = options.pinned_bytes >= 0 ? options.pinned_bytes : warm + warm / 4;
    absl::StatusOr<std::unique_ptr<Backend>> gpu =
        CreateCudaBackend(model, {.dtype = dtype, .pinned_block_bytes = pinned});
    if (gpu.ok()) {
      std::fprintf(stderr,
                   "kvmemd: device %s: CUDA backend, %s weights and KV, KV blocks in up to %.2f "
                   "GiB of pinned host memory\n",
                   options.device.c_str(), DeviceDtypeName(dtype),
                   static_cast<double>(pinned) / (1 << 30));
      return gpu;
    }
    if (options.device == "cuda" || gpu.status().code() != absl::StatusCode::kUnavailable) {
      return absl::Status(gpu.status().code(),
                          absl::StrCat("--device ", options.device, ": ", gpu.status().message(),
                                       "; run with --device cpu to use the CPU backend"));
    }
    std::fprintf(stderr, "kvmemd: device auto: %s; using the CPU backend\n",
                 std::string(gpu.status().message()).c_str());
  }
  return std::unique_ptr<Backend>(
      std::make_unique<CpuBackend>(model, CpuBackendOptions{.threads = options.backend_threads}));
}

int Serve(const KvmemdOptions& options, int stop_fd) {
  if (options.device != "cpu" && options.device != "cuda" && options.device != "auto") {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--device must be cpu, cuda or auto, got \"", options.device, "\"")));
  }
  if (options.pinned_bytes < -1) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--pinned-bytes must be -1 (warm-bytes + 25%), 0 (off) or a byte count, got ",
                     options.pinned_bytes)));
  }
  absl::StatusOr<DeviceDtype> dtype = ParseDeviceDtype(options.device_dtype);
  if (!dtype.ok()) return Fail(dtype.status());
  absl::StatusOr<std::string> dir = ResolveModelDir(options.model);
  if (!dir.ok()) return Fail(dir.status());
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(*dir);
  if (!model.ok()) return Fail(model.status());
  std::unique_ptr<TokenTable> tokens;
  if (!options.auth_tokens.empty()) {
    absl::StatusOr<TokenTable> table = TokenTable::Load(options.auth_tokens);
    if (!table.ok()) return Fail(table.status());
    tokens = std::make_unique<TokenTable>(*std::move(table));
  }
  absl::StatusOr<std::unique_ptr<Backend>> backend = SelectBackend(options, **model, *dtype);
  if (!backend.ok()) return Fail(backend.status());
  absl::StatusOr<std::unique_ptr<SessionManager>> sessions =
      SessionManager::Open(**model, **backend, options.sessions);
  if (!sessions.ok()) return Fail(sessions.status());

  WorkerPool workers(options.threads);
  AgentMemoryService service(**sessions, workers, (*model)->config(), tokens.get());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  // Room for the longest content the SessionManager accepts, so an oversized turn gets its
  // INVALID_ARGUMENT from the manager's check rather than a transport error.
  const int64_t max_message = options.sessions.max_content_bytes + (1 << 20);
  builder.SetMaxReceiveMessageSize(
      static_cast<int>(std::min<int64_t>(max_message, std::numeric_limits<int>::max())));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return Fail(absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen,
                     " (address in use or malformed?); pick another with --listen HOST:PORT")));
  }
  server->GetHealthCheckService()->SetServingStatus(true);
  std::printf("kvmemd: listening on %s\n", BoundAddress(options.listen, port).c_str());
  std::fflush(stdout);
  const std::string auth = tokens ? absl::StrCat(tokens->size(), " auth tokens") : "no auth";
  const std::string store = options.sessions.data_dir.empty()
                                ? "in memory"
                                : absl::StrCat("data in ", options.sessions.data_dir);
  std::fprintf(stderr, "kvmemd: model %s (fingerprint %s), %d workers, %s, %s\n", dir->c_str(),
               (*model)->fingerprint().c_str(), workers.size(), auth.c_str(), store.c_str());

  unsigned char signal_number = 0;
  while (read(stop_fd, &signal_number, 1) < 0 && errno == EINTR) {
  }
  std::fprintf(stderr, "kvmemd: %s: shutting down\n", strsignal(signal_number));
  server->GetHealthCheckService()->SetServingStatus(false);
  server->Shutdown(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(options.shutdown_grace_ms));
  workers.Stop();
  server->Wait();
  sessions->reset();  // closes the store after the last call
  std::fprintf(stderr, "kvmemd: stopped\n");
  return 0;
}

}  // namespace
}  // namespace kvmem

namespace {
int stop_pipe[2] = {-1, -1};

// Async-signal-safe: hands the signal to Serve's read. A handler (not a blocked mask and
// sigwait) because threads that libraries start before main (OpenBLAS's pool) would not
// inherit a mask and would die of the default action.
void OnStopSignal(int signal_number) {
  const int saved = errno;
  const unsigned char byte = static_cast<unsigned char>(signal_number);
  (void)!write(stop_pipe[1], &byte, 1);
  errno = saved;
}
}  // namespace

int main(int argc, char** argv) {
  kvmem::ShareOneMallocArena();  // before any thread starts
  if (pipe(stop_pipe) != 0) {
    std::perror("kvmemd: pipe");
    return 1;
  }
  struct sigaction action = {};
  action.sa_handler = OnStopSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);

  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(kvmem::KvmemdUsage().c_str(), stdout);
      return 0;
    }
  }
  absl::StatusOr<kvmem::KvmemdOptions> options = kvmem::ParseKvmemdFlags(argc, argv);
  if (!options.ok()) {
    std::fprintf(stderr, "kvmemd: %s\n", std::string(options.status().message()).c_str());
    return 2;
  }
  return kvmem::Serve(*options, stop_pipe[0]);
}
