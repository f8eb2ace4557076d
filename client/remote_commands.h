// The `kvmem` subcommands that talk to a running kvmemd through AgentMemoryClient:
// create, append, generate, show, ls, fork, rm and chat.
//
// Output: results on stdout (generated text is streamed as it arrives); errors on stderr as
// "kvmem: CODE_NAME: message". Exit status: 0 on success, 1 when the server (or the
// connection) answered with an error, 2 for a malformed command line.
#ifndef KVMEM_CLIENT_REMOTE_COMMANDS_H_
#define KVMEM_CLIENT_REMOTE_COMMANDS_H_

#include <string>
#include <vector>

namespace kvmem {

// The usage text of every remote subcommand.
extern const char kRemoteUsage[];

bool IsRemoteCommand(const std::string& command);

// Runs `command` with its arguments (everything after the command name). `global_args` are
// the flags given before the command (--addr, --token, --timeout-ms); the same flags after it
// win. Defaults: --addr $KVMEM_ADDR or 127.0.0.1:50051, --token $KVMEM_TOKEN.
int RunRemoteCommand(const std::string& command, const std::vector<std::string>& global_args,
                     const std::vector<std::string>& args);

}  // namespace kvmem

#endif  // KVMEM_CLIENT_REMOTE_COMMANDS_H_
