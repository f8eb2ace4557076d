"""kvmem: a Python client of kvmemd, the agent memory service (kvmem.v1.AgentMemory).

    from kvmem import Client

    with Client("127.0.0.1:50051") as kv:
        sid = kv.create_session(labels={"agent": "demo"}).session_id
        kv.append(sid, "user", "Once upon a time")
        for delta in kv.stream(sid, max_tokens=32):
            print(delta, end="", flush=True)

Errors raise KvmemError, whose `code` is the grpc.StatusCode the server answered with.
The generated messages are in kvmem.v1.agent_memory_pb2.
"""

from kvmem.client import Client, Generation, KvmemError

__all__ = ["Client", "Generation", "KvmemError"]
