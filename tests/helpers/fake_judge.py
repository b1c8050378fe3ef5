"""An OpenAI-compatible judge on loopback that *writes* answers (ImgEdit rubric lines, VIEScore JSON),
scripted per instruction, for end-to-end tests of ``editr1 test``.

``answers[instruction]`` is a list of replies given in turn (the last repeats): a list of ints is
formatted in the protocol's answer format (three ``Criterion: n`` lines for an ImgEdit rubric, using the
criterion names the prompt asks for; ``{"score": [...]}`` for VIEScore), a string is sent as is.
Perceptual-quality requests (one image, no instruction) get ``pq`` (default ``[8, 6]``).
"""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJudge:
    def __init__(self, answers: dict[str, list], pq: list | str = (8, 6), status: int = 200) -> None:
        self.answers = answers
        self.pq = list(pq) if not isinstance(pq, str) else pq
        self.status = status
        self.requests: list[dict] = []
        self.seen: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                if fake.status != 200:
                    return self._json(fake.status, {"error": {"message": f"scripted {fake.status}"}})
                content = body["messages"][0]["content"]
                text = next(p["text"] for p in content if p["type"] == "text")
                n_images = sum(p["type"] == "image_url" for p in content)
                reply = fake.reply(text, n_images)
                return self._json(
                    200,
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "fake-judge-1",
                        "system_fingerprint": "fp_test",
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                        ],
                    },
                )

            def _json(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def reply(self, text: str, n_images: int) -> str:
        m = re.search(r"^Edit instruction: (.+)$", text, re.M)
        if m:  # an ImgEdit rubric
            criteria = re.findall(r"^(.+): <1-5>$", text, re.M)
            value = self._next(m.group(1).strip())
            if isinstance(value, str):
                return value
            return "Brief reasoning: scripted.\n" + "\n".join(f"{c}: {v}" for c, v in zip(criteria, value))
        m = re.search(r"^Instruction: (.+)$", text, re.M)
        if m and n_images == 2:  # VIEScore semantic consistency
            value = self._next(m.group(1).strip())
        else:  # perceptual quality: the edit alone
            value = self.pq
        return value if isinstance(value, str) else json.dumps({"score": value, "reasoning": "scripted"})

    def _next(self, instruction: str):
        with self.lock:
            script = self.answers.get(instruction, [[3, 3, 3]])
            i = self.seen[instruction]
            self.seen[instruction] += 1
        return script[min(i, len(script) - 1)]

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
