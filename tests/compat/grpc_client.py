"""Calls the compat.Echo server of grpc_server.py: unary, bidirectional streaming, and a call
to the slow method whose deadline passes first. Prints one line per check; exits 1 on the
first that fails.

Usage: grpc_client.py HOST:PORT
"""
import sys

import grpc


def identity(b):
    return b


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        sys.exit(1)


def main():
    target = sys.argv[1]
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        unary = channel.unary_unary(
            "/compat.Echo/Unary", request_serializer=identity, response_deserializer=identity
        )
        stream = channel.stream_stream(
            "/compat.Echo/Stream", request_serializer=identity, response_deserializer=identity
        )
        slow = channel.unary_unary(
            "/compat.Echo/Slow", request_serializer=identity, response_deserializer=identity
        )

        answer = unary(b"hello", timeout=10)
        check(answer == b"echo:hello", f"unary: {answer!r}")

        big = bytes(range(256)) * 4096
        answer = unary(big, timeout=10)
        check(answer == b"echo:" + big, f"unary with a 1 MiB message: {len(answer)} bytes")

        sent = [f"message {i}".encode() for i in range(100)]
        got = list(stream(iter(sent), timeout=10))
        check(got == [b"echo:" + m for m in sent], f"stream: {len(got)} of {len(sent)} answers")

        try:
            answer = slow(b"3000", timeout=0.5)
            check(False, f"slow with a 0.5 s deadline answered {answer!r}")
        except grpc.RpcError as e:
            check(
                e.code() == grpc.StatusCode.DEADLINE_EXCEEDED,
                f"slow with a 0.5 s deadline: {e.code()}",
            )

        answer = unary(b"after", timeout=10)
        check(answer == b"echo:after", f"unary after the deadline: {answer!r}")


if __name__ == "__main__":
    main()
