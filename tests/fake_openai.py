"""A scripted OpenAI-compatible server on loopback for fault tests of the served reward."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(top: list[tuple[str, float]], chosen: str | None = None) -> dict:
    chosen = chosen if chosen is not None else top[0][0]
    lp = dict(top).get(chosen, -5.0)
    entry = lambda t, p: {"token": t, "logprob": p, "bytes": list(t.encode())}  # noqa: E731
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": chosen},
                "finish_reason": "length",
                "logprobs": {"content": [dict(entry(chosen, lp), top_logprobs=[entry(t, p) for t, p in top])]},
            }
        ],
    }


class FakeOpenAI:
    """Each request takes the next step of ``script`` (the last step repeats). A step is one of
    ``("ok", top)``, ``("ok_chosen", top, chosen)``, ``("status", code)``, ``("slow", seconds, top)``,
    ``("malformed",)``, ``("no_logprobs",)``, ``("json", body)`` (any JSON-serialisable body, sent as is with
    status 200; Python's ``json`` writes NaN and Infinity as the bare words ``NaN``/``Infinity``) or
    ``("raw", data)`` (these bytes as the body). Requests are recorded in ``self.requests``."""

    def __init__(self, script: list[tuple]) -> None:
        self.script = list(script)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"body": body, "headers": dict(self.headers)})
                    step = fake.script.pop(0) if len(fake.script) > 1 else fake.script[0]
                kind = step[0]
                if kind == "slow":
                    time.sleep(step[1])
                    return self._json(200, completion(step[2]))
                if kind == "status":
                    return self._json(
                        step[1], {"error": {"message": f"scripted {step[1]}", "type": "x", "code": step[1]}}
                    )
                if kind == "malformed":
                    return self._raw(200, b"{this is not json")
                if kind == "no_logprobs":
                    payload = completion([("3", -0.1)])
                    payload["choices"][0]["logprobs"] = None
                    return self._json(200, payload)
                if kind == "json":
                    return self._json(200, step[1])
                if kind == "raw":
                    return self._raw(200, step[1])
                if kind == "ok_chosen":
                    return self._json(200, completion(step[1], step[2]))
                return self._json(200, completion(step[1]))

            def _json(self, code, payload):
                self._raw(code, json.dumps(payload).encode())

            def _raw(self, code, data):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
