"""A webhook receiver for restock-notifier, verified with the `standardwebhooks` package.

    pip install standardwebhooks
    RESTOCK_WEBHOOK_SECRET=whsec_... python receiver.py 8080

It does what every receiver must: verify the signature against the raw body, drop a
`webhook-id` it has already handled (a notification can arrive twice: after a resume, a
crash or a hand-over, always with the same id), and answer 2xx fast, handing the work
to a queue of its own rather than doing it before answering.
"""

import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

# Every secret the receiver accepts: while rotating, the old and the new one.
WEBHOOKS = [Webhook(s) for s in os.environ["RESTOCK_WEBHOOK_SECRET"].split()]
SEEN = set()  # in production: a table with a unique key on webhook-id


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the service reuses connections

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        headers = {k.lower(): v for k, v in self.headers.items()}
        event = None
        for webhook in WEBHOOKS:
            try:
                event = webhook.verify(body, headers)
                break
            except WebhookVerificationError:
                continue
        if event is None:
            return self.answer(400)  # permanent: the run stops, an operator looks
        webhook_id = headers["webhook-id"]
        if webhook_id not in SEEN:
            SEEN.add(webhook_id)
            data = event["data"]
            print(webhook_id, data["userId"], data["message"], flush=True)
        self.answer(204)

    def answer(self, status):
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
