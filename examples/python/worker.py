"""A worker in plain Python (standard library only) for lb.

It serves HTTP on $PORT, reads lb's messages from its channel ($LB_CHANNEL_FD: one
JSON value per line), remembers the last one, and answers each with {"ack": message},
which lb logs (at debug level: LB_LOG=debug). GET / shows the last message.
"""
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

last_message = None
channel = socket.socket(fileno=int(os.environ["LB_CHANNEL_FD"]))
send_lock = threading.Lock()


def send(value):
    """One compact JSON value per line, as lb (and Node) expect."""
    with send_lock:
        channel.sendall(json.dumps(value, separators=(",", ":")).encode() + b"\n")


def read_channel():
    global last_message
    for line in channel.makefile("rb"):
        if line.strip():
            last_message = json.loads(line)
            send({"ack": last_message})


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"worker": os.environ["LB_WORKER_ID"], "last_message": last_message}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


threading.Thread(target=read_channel, daemon=True).start()
server = ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"), int(os.environ["PORT"])), Handler)
print(f"python worker {os.environ['LB_WORKER_ID']} listening on port {os.environ['PORT']}", flush=True)
server.serve_forever()
