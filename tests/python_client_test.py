#!/usr/bin/env python3
"""The Python client (client/python/kvmem) and examples/agent_loop.py against a real kvmemd.

Run by ctest with PYTHONPATH (the assembled package), KVMEM_BIN_DIR, KVMEM_TEST_MODEL_DIR and
KVMEM_SOURCE_DIR set by CMake.
"""

import os
import select
import subprocess
import sys
import tempfile
import time
import unittest

import grpc

import kvmem
from kvmem.v1 import agent_memory_pb2 as pb

BIN_DIR = os.environ["KVMEM_BIN_DIR"]
MODEL_DIR = os.environ["KVMEM_TEST_MODEL_DIR"]
SOURCE_DIR = os.environ["KVMEM_SOURCE_DIR"]


class Kvmemd:
    """kvmemd on a free loopback port, until stop()."""

    def __init__(self, *args):
        self.process = subprocess.Popen(
            [os.path.join(BIN_DIR, "kvmemd"), "--listen", "127.0.0.1:0", "--model", MODEL_DIR,
             "--backend-threads", "1", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.process.stdout], [], [], 30)
        line = self.process.stdout.readline() if ready else ""
        if "listening on" not in line:
            self.process.kill()
            raise RuntimeError(f"kvmemd did not start: {self.process.stderr.read()}")
        self.address = line.split("listening on ")[1].strip()

    def stop(self):
        self.process.terminate()
        return self.process.wait(timeout=30)


class PythonClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Kvmemd()
        cls.kv = kvmem.Client(cls.server.address, timeout=60)

    @classmethod
    def tearDownClass(cls):
        cls.kv.close()
        assert cls.server.stop() == 0, "kvmemd did not exit cleanly on SIGTERM"

    def test_session_lifecycle_with_streamed_reply(self):
        self.assertEqual(self.kv.health(), "SERVING")
        session = self.kv.create_session("py-life", labels={"lang": "python"}, hot_budget=64,
                                         pooling="avg")
        self.assertEqual(session.memory.hot_budget, 64)
        self.assertEqual(session.memory.pooling, pb.POOLING_AVG)
        appended = self.kv.append("py-life", "user", "Once upon a time")
        self.assertEqual(appended.turn_index, 0)

        generation = self.kv.stream("py-life", max_tokens=20)
        deltas = list(generation)
        self.assertGreater(len(deltas), 1)
        self.assertEqual("".join(deltas), generation.usage.text)
        self.assertTrue(generation.text.startswith(", there was a little girl named Lily."),
                        generation.text)
        self.assertEqual(generation.usage.generated_tokens, 20)
        self.assertEqual(generation.usage.turn_index, 1)

        info = self.kv.get_session("py-life")
        self.assertEqual(info.turns, 2)
        self.assertEqual(info.total_tokens, appended.total_tokens + 20)
        self.assertEqual(len(info.hot_tokens_per_head), info.num_layers * info.num_kv_heads)
        listed = self.kv.list_sessions(labels={"lang": "python"}, page_size=1)
        self.assertIn("py-life", [s.session_id for s in listed])

        fork = self.kv.fork_session("py-life", "py-life-fork")
        text, usage = self.kv.generate(fork.session_id, max_tokens=5, discard=True)
        self.assertEqual(usage.turn_index, -1)
        self.assertEqual(text, usage.text)
        self.kv.delete_session("py-life-fork")
        with self.assertRaises(kvmem.KvmemError) as gone:
            self.kv.get_session("py-life-fork")
        self.assertEqual(gone.exception.code, grpc.StatusCode.NOT_FOUND)

    def test_errors_carry_the_status_code(self):
        self.kv.create_session("py-err")
        cases = [
            (lambda: self.kv.append("py-err", "narrator", "hi"), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: self.kv.append("py-err", "user", ""), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: self.kv.append("py-err", "user", "hi", expected_turns=3),
             grpc.StatusCode.FAILED_PRECONDITION),
            (lambda: self.kv.generate("py-err", temperature=-1.0),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: self.kv.create_session("py-err"), grpc.StatusCode.ALREADY_EXISTS),
            (lambda: self.kv.create_session(policy="lru"), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: self.kv.get_session("nobody"), grpc.StatusCode.NOT_FOUND),
        ]
        for call, code in cases:
            with self.assertRaises(kvmem.KvmemError) as e:
                call()
            self.assertEqual(e.exception.code, code, e.exception)
            self.assertTrue(e.exception.message)

    def test_cancelled_stream_keeps_nothing(self):
        self.kv.create_session("py-cancel")
        self.kv.append("py-cancel", "user", "Once upon a time")
        before = self.kv.get_session("py-cancel")
        generation = self.kv.stream("py-cancel", max_tokens=100000, ignore_eos=True)
        with self.assertRaises(kvmem.KvmemError) as e:
            for i, _ in enumerate(generation):
                if i == 2:
                    generation.cancel()
        self.assertEqual(e.exception.code, grpc.StatusCode.CANCELLED)
        after = kvmem.Client(self.server.address, timeout=20).get_session("py-cancel")
        self.assertEqual(after.turns, before.turns)
        self.assertEqual(after.total_tokens, before.total_tokens)

    def test_retried_append_with_request_id_applies_once(self):
        self.kv.create_session("py-retry")
        first = self.kv.append("py-retry", "user", "Hello there.", request_id="r-1")
        again = self.kv.append("py-retry", "user", "Hello there.", request_id="r-1")
        self.assertEqual(first.turn_index, again.turn_index)
        self.assertEqual(self.kv.get_session("py-retry").turns, 1)

    def test_agent_loop_example_runs_to_the_end(self):
        example = os.path.join(SOURCE_DIR, "examples", "agent_loop.py")
        run = subprocess.run(
            [sys.executable, example, "--addr", self.server.address, "--steps", "2",
             "--max-tokens", "16", "--cleanup"],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn("[step 1] tool: critic:", run.stdout)
        self.assertIn("final: 6 turns", run.stdout)


class PythonAuthTest(unittest.TestCase):
    def test_token_selects_the_tenant(self):
        with tempfile.NamedTemporaryFile("w", suffix=".tokens") as tokens:
            tokens.write("py-secret alice\n")
            tokens.flush()
            server = Kvmemd("--auth-tokens", tokens.name)
            try:
                with self.assertRaises(kvmem.KvmemError) as e:
                    kvmem.Client(server.address).list_sessions()
                self.assertEqual(e.exception.code, grpc.StatusCode.UNAUTHENTICATED)
                with kvmem.Client(server.address, token="py-secret") as alice:
                    alice.create_session("mine")
                    self.assertEqual([s.session_id for s in alice.list_sessions()], ["mine"])
            finally:
                self.assertEqual(server.stop(), 0)


if __name__ == "__main__":
    unittest.main()
