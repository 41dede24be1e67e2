"""An S3-compatible server on the loopback for the object-store tests: moto's server mode behind a small gate.

The gate does two things moto does not:
- it makes a conditional PUT (If-None-Match / If-Match) and a conditional multipart completion atomic. moto
  checks "does the key exist?" and then stores the object in two steps, with no lock between them, so two
  racing `If-None-Match: *` PUTs can both succeed there (real S3 decides them atomically). Serialising the
  conditional requests gives the tests the semantics S3 documents;
- it injects faults: the next N requests matching a method and a key fragment answer an S3 error
  (503 SlowDown, 500 InternalError, 403 AccessDenied ...), as a throttled or failing store would.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIATESTCXRGENKEY0042", "AWS_SECRET_ACCESS_KEY": "cxrgen-secret-s3kr1t-DO-NOT-LEAK",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Fault:
    method: str  # "PUT", "GET", ... or "*"
    fragment: str  # a part of the path ("/images/"), "" for every path
    status: int
    code: str
    count: int  # how many requests still get it; -1: all
    after: bool = False  # the request reaches the store first, then the error answers it (a lost response)


class Gate:
    """WSGI middleware in front of moto: atomic conditional writes and injected faults; logs every request as
    [method, path, HTTP status, query string]; faults match the path."""

    def __init__(self, app):
        self.app, self.faults, self.lock = app, [], threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.conditional = threading.Lock()

    def fail(self, method: str, fragment: str, status: int = 503, code: str = "SlowDown", count: int = 1,
             after: bool = False) -> Fault:
        fault = Fault(method, fragment, status, code, count, after)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def __call__(self, environ, start_response):
        method, path, query = environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
        entry = [method, path, 0, query]
        with self.lock:
            self.requests.append(entry)
            hit = next((f for f in self.faults if f.count != 0 and f.method in ("*", method) and f.fragment in path),
                       None)
            if hit is not None:
                hit.count -= 1 if hit.count > 0 else 0
        if hit is not None:
            if hit.after:
                with self.conditional:
                    list(self.app(environ, lambda *a, **k: None))
            entry[2] = hit.status
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{hit.code}</Code>'
                    f"<Message>injected by the test</Message></Error>").encode()
            start_response(f"{hit.status} {hit.code}", [("Content-Type", "application/xml"),
                                                        ("Content-Length", str(len(body)))])
            return [body]
        def answer(status, headers, *rest):
            entry[2] = int(status.split()[0])
            return start_response(status, headers, *rest)
        conditional = ("HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MATCH" in environ) and method in ("PUT", "POST")
        if conditional:
            with self.conditional:
                return list(self.app(environ, answer))
        return self.app(environ, answer)


class GatedMotoServer(ThreadedMotoServer):
    """ThreadedMotoServer whose WSGI app is wrapped by a Gate (self.gate)."""

    def __init__(self, ip_address: str = "127.0.0.1", port: int = 0):
        super().__init__(ip_address=ip_address, port=port or free_port(), verbose=False)
        self.gate = Gate(DomainDispatcherApplication(create_backend_app))

    def _server_entry(self) -> None:
        self._server = make_server(self._ip_address, self._port, self.gate, True, request_handler=_Quiet)
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint(self) -> str:
        return f"http://{self._ip_address}:{self._port}"


class _Quiet(MotoRequestHandler):
    def log_request(self, *args, **kwargs) -> None:  # no access log on the test's stderr
        pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment(endpoint: str) -> dict:
    """The variables a process needs to reach the server: endpoint and (fake) credentials."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                 region_name="us-east-1").create_bucket(Bucket=name)
