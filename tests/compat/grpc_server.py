"""A gRPC server with grpcio's generic handlers (no generated code, bytes in and out).

Service `compat.Echo`:
- `Unary`: answers `echo:` + the request.
- `Stream`: answers each request message with `echo:` + the message, as they come.
- `Slow`: sleeps for the number of milliseconds the request names, then answers `late`.

Usage: grpc_server.py PORT (listens on [::]:PORT, IPv4 included).
"""
import sys
import time
from concurrent import futures

import grpc


def identity(b):
    return b


def unary(request, context):
    return b"echo:" + request


def stream(requests, context):
    for message in requests:
        yield b"echo:" + message


def slow(request, context):
    time.sleep(int(request) / 1000)
    return b"late"


def main():
    port = int(sys.argv[1])
    handler = grpc.method_handlers_generic_handler(
        "compat.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=identity, response_serializer=identity
            ),
            "Stream": grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=identity, response_serializer=identity
            ),
            "Slow": grpc.unary_unary_rpc_method_handler(
                slow, request_deserializer=identity, response_serializer=identity
            ),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    print(f"serving compat.Echo on [::]:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
