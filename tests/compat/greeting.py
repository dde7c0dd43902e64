"""A client of a server-first protocol that never speaks: connects, waits for the server's
greeting and prints it. Exits 1 when none comes within 10 s.

Usage: greeting.py HOST PORT
"""
import socket
import sys

with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
    s.settimeout(10)
    try:
        greeting = s.recv(512)
    except socket.timeout:
        print("no greeting within 10 s", file=sys.stderr)
        sys.exit(1)
    print(greeting.decode(errors="replace").strip())
    sys.exit(0 if greeting else 1)
