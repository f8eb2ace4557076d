"""Client of kvmem.v1.AgentMemory over Debian's python3-grpcio, one method per RPC."""

import grpc

from kvmem.v1 import agent_memory_pb2 as pb
from kvmem.v1 import agent_memory_pb2_grpc as pb_grpc

_ROLES = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
_POOLINGS = {"max": pb.POOLING_MAX, "avg": pb.POOLING_AVG}
_HEALTH = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]


class KvmemError(Exception):
    """A call that failed: `code` is the grpc.StatusCode, `message` the server's explanation."""

    def __init__(self, code, message):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _error(rpc_error):
    return KvmemError(rpc_error.code(), rpc_error.details())


class Generation:
    """One streamed generation. Iterate it for the text deltas; once iteration ends, `usage`
    holds the final GenerateUsage and `text` the whole reply. `cancel()` stops decoding: the
    server keeps nothing of a cancelled generation (iteration then raises KvmemError with
    grpc.StatusCode.CANCELLED)."""

    def __init__(self, call):
        self._call = call
        self._parts = []
        self.usage = None

    def __iter__(self):
        try:
            for response in self._call:
                if response.text:
                    self._parts.append(response.text)
                    yield response.text
                if response.HasField("usage"):
                    self.usage = response.usage
        except grpc.RpcError as e:
            raise _error(e) from None

    @property
    def text(self):
        return "".join(self._parts)

    def cancel(self):
        self._call.cancel()


class Client:
    """A connection to kvmemd. `token` is sent as "authorization: Bearer TOKEN"; `timeout`
    (seconds) is the deadline of every call. Usable as a context manager; thread-safe."""

    def __init__(self, addr="127.0.0.1:50051", token=None, timeout=None):
        self._channel = grpc.insecure_channel(addr)
        self._stub = pb_grpc.AgentMemoryStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _unary(self, method, request):
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as e:
            raise _error(e) from None

    def wait_ready(self, timeout=10.0):
        """Blocks until the channel connects; raises grpc.FutureTimeoutError after `timeout`."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def health(self):
        """The server's status from the standard health service: "SERVING", "NOT_SERVING", ..."""
        # grpc.health.v1.HealthCheckRequest{service=""} is the empty message; the response's
        # only field is `status` (field 1, varint), so no generated stubs are needed.
        check = self._channel.unary_unary("/grpc.health.v1.Health/Check")
        answer = self._unary(check, b"")
        status = answer[1] if len(answer) >= 2 and answer[0] == 0x08 else 0
        return _HEALTH[status] if status < len(_HEALTH) else str(status)

    def create_session(self, session_id="", labels=None, chat_template="", policy=None,
                       hot_budget=None, window=None, kernel=None, pooling=None,
                       recall_blocks=None):
        """Creates a session (id generated when empty); unset memory options keep the server's
        defaults. `pooling` is "max" or "avg". Returns the Session."""
        request = pb.CreateSessionRequest(session_id=session_id, labels=labels or {},
                                          chat_template=chat_template)
        memory = request.memory
        if policy is not None:
            memory.policy = policy
        if hot_budget is not None:
            memory.hot_budget = hot_budget
        if window is not None:
            memory.window = window
        if kernel is not None:
            memory.kernel = kernel
        if pooling is not None:
            memory.pooling = _POOLINGS[pooling]
        if recall_blocks is not None:
            memory.recall_blocks = recall_blocks
        return self._unary(self._stub.CreateSession, request)

    def append(self, session_id, role, content, expected_turns=None, request_id=""):
        """Appends a turn; `role` is "system", "user", "assistant" or "tool". With
        `expected_turns`, applies only if the session has that many turns (else
        FAILED_PRECONDITION); a retry with the same `request_id` is applied once."""
        request = pb.AppendTurnRequest(session_id=session_id, content=content,
                                       request_id=request_id)
        request.role = _ROLES.get(role, pb.ROLE_UNSPECIFIED) if isinstance(role, str) else role
        if expected_turns is not None:
            request.expected_turns = expected_turns
        return self._unary(self._stub.AppendTurn, request)

    def stream(self, session_id, max_tokens=0, temperature=0.0, top_p=0.0, top_k=0, seed=0,
               stop=(), discard=False, ignore_eos=False, expected_turns=None, request_id=""):
        """Starts a generation and returns a Generation to iterate for text deltas. Unless
        `discard`, the reply becomes the session's assistant turn."""
        request = pb.GenerateRequest(session_id=session_id, max_tokens=max_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k,
                                     seed=seed, stop=list(stop), discard=discard,
                                     ignore_eos=ignore_eos, request_id=request_id)
        if expected_turns is not None:
            request.expected_turns = expected_turns
        return Generation(self._stub.Generate(request, metadata=self._metadata,
                                              timeout=self._timeout))

    def generate(self, session_id, **kwargs):
        """Like stream(), but waits for the whole reply: returns (text, GenerateUsage)."""
        generation = self.stream(session_id, **kwargs)
        for _ in generation:
            pass
        return generation.text, generation.usage

    def get_session(self, session_id):
        return self._unary(self._stub.GetSession, pb.GetSessionRequest(session_id=session_id))

    def list_sessions(self, labels=None, page_size=0):
        """Every session of the caller's tenant (all pages), ordered by id; `labels` filters."""
        request = pb.ListSessionsRequest(page_size=page_size, label_filter=labels or {})
        sessions = []
        while True:
            page = self._unary(self._stub.ListSessions, request)
            sessions.extend(page.sessions)
            if not page.next_page_token:
                return sessions
            request.page_token = page.next_page_token

    def fork_session(self, session_id, new_session_id=""):
        return self._unary(self._stub.ForkSession,
                           pb.ForkSessionRequest(session_id=session_id,
                                                 new_session_id=new_session_id))

    def delete_session(self, session_id):
        self._unary(self._stub.DeleteSession, pb.DeleteSessionRequest(session_id=session_id))
