#!/usr/bin/env python3
"""An agent loop whose memory is a kvmem session.

Each step the model acts (a generated assistant turn), the environment answers with an
observation (a tool turn), and the loop continues. The conversation is never re-sent: every
turn goes to kvmemd once, and the session's KV cache (compressed by SnapKV at each turn
boundary, tiered, durable) is the agent's memory. Shows the habits an agent framework needs:

  - expected_turns: a turn applies only on top of the state the agent last saw, so two
    writers to one session cannot interleave unnoticed (FAILED_PRECONDITION otherwise);
  - request_id: a call retried after a lost connection is applied once;
  - fork: try a different continuation from the same memory without touching the original.

Run kvmemd first (build/bin/kvmemd), then:
    PYTHONPATH=build/python python3 examples/agent_loop.py [--addr HOST:PORT] [--steps N]
"""

import argparse
import os
import sys
import time
import uuid

try:
    import kvmem
except ImportError:  # run from a checkout: use the package the build assembled
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "build", "python"))
    import kvmem

import grpc

SYSTEM = "You are a storyteller. Tell a story about a dog named Max, one short part at a time."
TASK = "Once upon a time, there was a dog named Max."


def observe(reply):
    """The environment: a tiny critic tool that looks at the agent's last action."""
    words = len(reply.split())
    hero = "Max" in reply
    return f"critic: {words} words; the hero {'appears' if hero else 'is missing'}."


def with_retry(call, attempts=3):
    """Retries a call that failed because the server was unreachable. Safe for appends and
    generations because each carries a request_id: the server applies it once."""
    for attempt in range(attempts):
        try:
            return call()
        except kvmem.KvmemError as e:
            if e.code != grpc.StatusCode.UNAVAILABLE or attempt + 1 == attempts:
                raise
            time.sleep(0.5 * (attempt + 1))


def run(addr, token, steps, max_tokens, cleanup):
    kv = kvmem.Client(addr, token=token, timeout=60)
    session = kv.create_session(labels={"example": "agent_loop"}, hot_budget=128)
    sid = session.session_id
    print(f"session {sid}")

    turns = 0  # the turns this agent knows the session has
    for role, text in (("system", SYSTEM), ("user", TASK)):
        with_retry(lambda: kv.append(sid, role, text, expected_turns=turns,
                                     request_id=str(uuid.uuid4())))
        turns += 1

    for step in range(steps):
        # Act: stream the model's next move. A retry reuses the request id, so a reply the
        # server already kept is streamed again rather than generated twice.
        request_id = str(uuid.uuid4())

        def act():
            print(f"[step {step}] assistant: ", end="", flush=True)
            generation = kv.stream(sid, max_tokens=max_tokens, stop=["\n\n"],
                                   expected_turns=turns, request_id=request_id)
            for delta in generation:
                print(delta, end="", flush=True)
            print()
            return generation

        generation = with_retry(act)
        turns += 1
        # Observe: the environment's answer becomes a tool turn in the agent's memory.
        observation = observe(generation.text)
        print(f"[step {step}] tool: {observation}")
        appended = with_retry(lambda: kv.append(sid, "tool", observation, expected_turns=turns,
                                                request_id=str(uuid.uuid4())))
        turns += 1
        print(f"[step {step}] memory: {appended.total_tokens} tokens seen, "
              f"{appended.hot_tokens} hot entries, {appended.evicted} evicted this turn")

    # Explore an alternative ending on a fork; the original session is untouched.
    fork = kv.fork_session(sid)
    kv.append(fork.session_id, "user", "Now end the story happily.")
    ending, _ = kv.generate(fork.session_id, max_tokens=max_tokens, discard=True)
    print(f"alternative ending (fork {fork.session_id}): {ending}")
    kv.delete_session(fork.session_id)

    info = kv.get_session(sid)
    print(f"final: {info.turns} turns, {info.total_tokens} tokens, {info.hot_tokens} hot "
          f"entries, {info.warm_blocks} warm / {info.cold_blocks} cold blocks")
    assert info.turns == turns, "the session lost or gained a turn"
    if cleanup:
        kv.delete_session(sid)
    kv.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=os.environ.get("KVMEM_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("KVMEM_TOKEN"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--cleanup", action="store_true", help="delete the session at the end")
    args = parser.parse_args()
    try:
        run(args.addr, args.token, args.steps, args.max_tokens, args.cleanup)
    except kvmem.KvmemError as e:
        print(f"agent_loop: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
