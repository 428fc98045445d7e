#!/usr/bin/env python3
"""The example key-value client: writes a counter to the server every few
seconds and keeps the last value it read back in ./var/last-read."""
import os
import sys
import time
import urllib.request

server, key = sys.argv[1].rstrip("/"), sys.argv[2]
n = 0
while True:
    n += 1
    try:
        req = urllib.request.Request(f"{server}/kv/{key}", data=str(n).encode(), method="PUT")
        urllib.request.urlopen(req, timeout=5).read()
        value = urllib.request.urlopen(f"{server}/kv/{key}", timeout=5).read()
        os.makedirs("var", exist_ok=True)
        with open("var/last-read.tmp", "wb") as f:
            f.write(value)
        os.replace("var/last-read.tmp", "var/last-read")
    except Exception as e:  # the server may be restarting: try again
        print(f"kv client: {e}", file=sys.stderr, flush=True)
    time.sleep(2)
