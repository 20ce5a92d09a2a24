"""An OpenAI-compatible chat server on 127.0.0.1 for runtime tests: it streams ``tokens``
pieces ``delay`` s apart (a generation that lasts as long as a test wants)."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer(ThreadingHTTPServer):
    """An OpenAI-compatible chat server streaming ``tokens`` pieces, ``delay`` s apart."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.tokens = [f"t{i} " for i in range(5)]
        self.delay = 0.0
        self.bodies: list[dict] = []
        self.on_request = None  # called with the request count before answering

    def handle_error(self, request, client_address) -> None:
        pass  # the child being killed mid-answer is expected here

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        if self.server.on_request is not None:
            self.server.on_request(len(self.server.bodies))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in self.server.tokens:
            time.sleep(self.server.delay)
            event = {"choices": [{"delta": {"content": piece}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


def serve_chat():
    """A ChatServer in a thread for as long as the fixture lives."""
    server = ChatServer()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()
