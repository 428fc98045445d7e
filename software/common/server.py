#!/usr/bin/env python3
"""The small HTTP service the example software releases run.

Modes:
  files  serve the files under --root (GET), plus /healthz
  kv     an in-memory key-value store: PUT /kv/KEY stores the body,
         GET /kv/KEY returns it, GET /healthz answers ok
Logs one line per request to stderr (the partition's var/log).
"""
import argparse
import functools
import http.server
import signal
import socket
import sys


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--root", default=".")
    p.add_argument("--mode", choices=["files", "kv"], default="files")
    a = p.parse_args()

    store = {}

    class Files(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/healthz":
                return reply(self, 200, b"ok\n")
            return super().do_GET()

    class KV(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/healthz":
                return reply(self, 200, b"ok\n")
            key = self.path[len("/kv/"):] if self.path.startswith("/kv/") else None
            if key is None or key not in store:
                return reply(self, 404, b"no such key\n")
            return reply(self, 200, store[key])

        def do_PUT(self):
            if not self.path.startswith("/kv/"):
                return reply(self, 404, b"PUT /kv/KEY\n")
            length = int(self.headers.get("content-length", "0"))
            store[self.path[len("/kv/"):]] = self.rfile.read(length)
            return reply(self, 204, b"")

    def reply(handler, status, body):
        handler.send_response(status)
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    handler = functools.partial(Files, directory=a.root) if a.mode == "files" else KV

    class Server(http.server.ThreadingHTTPServer):
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in a.bind else socket.AF_INET

    server = Server((a.bind, a.port), handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"serving {a.mode} on {a.bind}:{a.port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
