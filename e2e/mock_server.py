#!/usr/bin/env python3
"""A stand-in for Caddy with caddy-batch, for developing the client programs.

It answers the two batch formats of SPEC §10 the way the real clients accept
them, in front of an in-memory copy of examples/legacyapi (same routes, same
answers). It is a reference for the shape of the answers, not an
implementation of the module: no limits, no parallelism, no async.

    python3 e2e/mock_server.py [-port 8080] [-capture DIR]

- JSON batch (Microsoft Graph $batch): POST to any path whose last segment is
  "$batch", Content-Type application/json. Step urls that start with "/" are
  taken relative to the service root (the batch path's directory), others
  relative to the batch URL; the service root is mapped onto the API's root,
  as a Caddyfile "handle_path /v1.0/*" would.
- multipart/mixed (Google API batch): POST /batch, Content-Type
  multipart/mixed; each application/http part holds one HTTP/1.1 request.
- Anything else is served by the users API directly (lone requests).

With -capture DIR every batch request and its answer are written to
DIR/NNN-request.txt and DIR/NNN-answer.txt, byte for byte.

Listens on 127.0.0.1 only; stdlib only.
"""

import argparse
import itertools
import json
import os
import re
import sys
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urljoin, urlsplit

CRLF = b"\r\n"


class UsersAPI:
    """examples/legacyapi in Python: /users, /users/{id}, /health."""

    def __init__(self):
        self.lock = threading.Lock()
        self.users = {}
        self.next_id = 1

    def serve(self, method, path, headers, body):
        """Returns (status, headers dict, body bytes)."""
        path = urlsplit(path).path
        if path == "/health":
            return _json(200, {"status": "ok"})
        if path != "/users" and not path.startswith("/users/"):
            return _json(404, {"error": "not found"})
        rest = path[len("/users"):].lstrip("/")
        with self.lock:
            if rest == "":
                return self._collection(method, body)
            if not rest.isdigit():
                return _json(404, {"error": "no such user"})
            return self._member(method, int(rest), body)

    def _collection(self, method, body):
        if method == "GET":
            return _json(200, {"data": [self.users[k] for k in sorted(self.users)]})
        if method == "POST":
            user = _decode_user(body)
            if not isinstance(user, dict) or not user.get("name"):
                return _json(422, {"error": "a user needs a name"})
            user = _user(self.next_id, user)
            self.users[user["id"]] = user
            self.next_id += 1
            status, hdrs, out = _json(201, user)
            hdrs["Location"] = "/users/%d" % user["id"]
            return status, hdrs, out
        status, hdrs, out = _json(405, {"error": "method not allowed"})
        hdrs["Allow"] = "GET, POST"
        return status, hdrs, out

    def _member(self, method, uid, body):
        if uid not in self.users:
            return _json(404, {"error": "no such user"})
        if method == "GET":
            return _json(200, self.users[uid])
        if method in ("PUT", "PATCH"):
            patch = _decode_user(body)
            if not isinstance(patch, dict):
                return _json(400, {"error": "body must be a JSON user"})
            base = dict(self.users[uid]) if method == "PATCH" else {}
            base.update(patch)
            user = _user(uid, base)
            if not user["name"]:
                return _json(422, {"error": "a user needs a name"})
            self.users[uid] = user
            return _json(200, user)
        if method == "DELETE":
            del self.users[uid]
            return 204, {}, b""
        status, hdrs, out = _json(405, {"error": "method not allowed"})
        hdrs["Allow"] = "GET, PUT, PATCH, DELETE"
        return status, hdrs, out


def _decode_user(body):
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None


def _user(uid, fields):
    user = {"id": uid, "name": str(fields.get("name") or "")}
    if fields.get("email"):
        user["email"] = str(fields["email"])
    balance = fields.get("balance", 0)
    user["balance"] = balance if isinstance(balance, int) else 0
    return user


def _json(status, value):
    # Go's json.Encoder ends with a newline; so does this.
    return status, {"Content-Type": "application/json"}, (json.dumps(value, separators=(",", ":")) + "\n").encode()


def _is_json(content_type):
    mt = (content_type or "").split(";")[0].strip().lower()
    return mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))


def _reason(status):
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status %d" % status


class Fault(Exception):
    def __init__(self, status, code, message, details=()):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, list(details)


# ---- JSON batch (Graph $batch) -------------------------------------------


def json_batch(api, batch_path, raw):
    """Returns (status, headers, body) for a Graph $batch request body."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise Fault(400, "BadRequest", "the batch is not JSON: %s" % e)
    steps = doc.get("requests") if isinstance(doc, dict) else None
    if not isinstance(steps, list) or not steps:
        raise Fault(400, "BadRequest", 'the batch needs a non-empty "requests" array')
    details, ids = [], set()
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            details.append({"code": "BadRequest", "target": str(i), "message": "a request must be an object"})
            continue
        sid = step.get("id")
        if not isinstance(sid, str) or sid == "":
            details.append({"code": "BadRequest", "target": str(i), "message": "id must be a non-empty string"})
        elif sid in ids:
            details.append({"code": "BadRequest", "target": sid, "message": "duplicate id %r" % sid})
        ids.add(sid)
        if not isinstance(step.get("url"), str) or not step["url"]:
            details.append({"code": "BadRequest", "target": str(sid), "message": "url must be a non-empty string"})
    for step in steps:
        for dep in (step.get("dependsOn") or []) if isinstance(step, dict) else []:
            if dep not in ids:
                details.append({"code": "BadRequest", "target": str(step.get("id")), "message": "dependsOn names unknown id %r" % dep})
    if details:
        raise Fault(400, "BadRequest", "invalid batch: %d fault(s)" % len(details), details)

    root = batch_path.rsplit("/", 1)[0] + "/"  # service root: the batch path's directory
    results = {}
    for step in _dependency_order(steps):
        sid = step["id"]
        failed = [d for d in step.get("dependsOn") or [] if results[d]["status"] >= 400]
        if failed:
            results[sid] = {
                "id": sid,
                "status": 424,
                "headers": {"Content-Type": "application/json"},
                "body": {"error": {"code": "FailedDependency", "message": "dependency %s failed" % failed[0]}},
            }
            continue
        url = step["url"]
        target = root + url.lstrip("/") if url.startswith("/") else urljoin(batch_path, url)
        path = "/" + target[len(root):] if target.startswith(root) else target
        headers = {str(k): str(v) for k, v in (step.get("headers") or {}).items()}
        body = step.get("body")
        if body is None:
            data = b""
        elif isinstance(body, str):
            data = body.encode("utf-8")
        else:
            data = json.dumps(body).encode("utf-8")
        status, hdrs, out = api.serve(step.get("method", "GET").upper(), path, headers, data)
        result = {"id": sid, "status": status, "headers": hdrs}
        if out:
            # The SDK's BatchResponseContent JSON.stringify()s the body only when
            # headers["Content-Type"] (that exact key) is application/json, so a
            # JSON answer is embedded as JSON and every other one as text.
            if _is_json(hdrs.get("Content-Type")):
                result["body"] = json.loads(out)
            else:
                result["body"] = out.decode("utf-8", "replace")
        results[sid] = result
    answer = {"responses": [results[s["id"]] for s in steps]}
    return 200, {"Content-Type": "application/json"}, json.dumps(answer).encode()


def _dependency_order(steps):
    done, order, pending = set(), [], list(steps)
    while pending:
        ready = [s for s in pending if all(d in done for d in s.get("dependsOn") or [])]
        if not ready:
            raise Fault(400, "BadRequest", "dependsOn has a cycle")
        for s in ready:
            order.append(s)
            done.add(s["id"])
            pending.remove(s)
    return order


# ---- multipart/mixed (Google batch) ---------------------------------------


def multipart_batch(api, content_type, raw):
    m = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type, re.I)
    if not m:
        raise Fault(400, "BadRequest", "multipart/mixed needs a boundary")
    boundary = (m.group(1) or m.group(2)).encode()
    answers = []
    for part in _split_parts(raw, boundary):
        pheaders, payload = _split_head(part)
        if pheaders.get("content-type", "").split(";")[0].strip().lower() != "application/http":
            raise Fault(400, "BadRequest", "each part must be application/http")
        cid = pheaders.get("content-id", "")
        method, target, headers, body = _parse_http_request(payload)
        status, hdrs, out = api.serve(method, target, headers, body)
        answers.append((cid, status, hdrs, out))
    if not answers:
        raise Fault(400, "BadRequest", "the batch has no parts")

    out_boundary = "batch_" + uuid.uuid4().hex
    buf = bytearray()
    for cid, status, hdrs, out in answers:
        # Google's client finds its request again by the text after " + " in
        # "<response-BASE + N>": the request's Content-ID, brackets removed,
        # prefixed with "response-", brackets put back.
        inner = cid[1:-1] if cid.startswith("<") and cid.endswith(">") else cid
        buf += b"--" + out_boundary.encode() + CRLF
        buf += b"Content-Type: application/http" + CRLF
        buf += ("Content-ID: <response-%s>" % inner).encode() + CRLF
        buf += CRLF
        buf += ("HTTP/1.1 %d %s" % (status, _reason(status))).encode() + CRLF
        hdrs = dict(hdrs)
        hdrs["Content-Length"] = str(len(out))  # at least one header: the client needs "\r\n\r\n"
        for k, v in hdrs.items():
            buf += ("%s: %s" % (k, v)).encode() + CRLF
        buf += CRLF + out + CRLF
    buf += b"--" + out_boundary.encode() + b"--" + CRLF
    return 200, {"Content-Type": "multipart/mixed; boundary=" + out_boundary}, bytes(buf)


def _split_parts(raw, boundary):
    """The parts between "--boundary" lines; CRLF or bare LF line ends."""
    delim = re.compile(rb"(?:^|\r?\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r?\n|$)")
    parts, last, closed = [], None, False
    for m in delim.finditer(raw):
        if last is not None:
            parts.append(raw[last:m.start()])
        if m.group(1):
            closed = True
            break
        last = m.end()
    if not closed:
        raise Fault(400, "BadRequest", "multipart body has no closing delimiter")
    return parts


def _split_head(blob):
    m = re.search(rb"\r?\n\r?\n", blob)
    if m is None:
        head, rest = blob, b""
    else:
        head, rest = blob[:m.start()], blob[m.end():]
    headers = {}
    for line in re.split(rb"\r?\n", head):
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.decode("latin-1").strip().lower()] = v.decode("latin-1").strip()
    return headers, rest


def _parse_http_request(payload):
    line, _, rest = payload.partition(b"\n")
    parts = line.rstrip(b"\r").decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise Fault(400, "BadRequest", "bad request line %r" % line[:80])
    method, target = parts[0], parts[1]
    if target.startswith("http://") or target.startswith("https://"):
        target = urlsplit(target)._replace(scheme="", netloc="").geturl()
    headers, body = _split_head(rest) if not rest.startswith((b"\r\n", b"\n")) else ({}, rest.lstrip(b"\r\n"))
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return method, target, headers, body


# ---- HTTP ------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "caddy-batch-mock"

    def log_message(self, fmt, *args):
        sys.stderr.write("mock: " + fmt % args + "\n")

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status, headers, body):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status, headers, body

    def _handle(self):
        raw = self._body()
        path = urlsplit(self.path).path
        ctype = self.headers.get("Content-Type", "")
        is_batch = self.command == "POST" and (
            path.rsplit("/", 1)[-1] == "$batch" or path == "/batch")
        if not is_batch:
            return self._send(*self.server.api.serve(self.command, self.path, dict(self.headers), raw))
        try:
            if ctype.split(";")[0].strip().lower() == "multipart/mixed":
                answer = multipart_batch(self.server.api, ctype, raw)
            elif _is_json(ctype):
                answer = json_batch(self.server.api, path, raw)
            else:
                raise Fault(415, "UnsupportedMediaType", "a batch is application/json or multipart/mixed, got %r" % ctype)
        except Fault as f:
            err = {"code": f.code, "message": f.message}
            if f.details:
                err["details"] = f.details
            answer = (f.status, {"Content-Type": "application/json"}, json.dumps({"error": err}).encode())
        sent = self._send(*answer)
        self._capture(raw, sent)

    def _capture(self, raw, sent):
        d = self.server.capture
        if not d:
            return
        n = next(self.server.counter)
        with open(os.path.join(d, "%03d-request.txt" % n), "wb") as f:
            f.write(("%s %s %s\r\n" % (self.command, self.path, self.request_version)).encode())
            f.write(str(self.headers).replace("\n", "\r\n").encode())
            f.write(raw)
        status, headers, body = sent
        with open(os.path.join(d, "%03d-answer.txt" % n), "wb") as f:
            f.write(("HTTP/1.1 %d %s\r\n" % (status, _reason(status))).encode())
            for k, v in list(headers.items()) + [("Content-Length", str(len(body)))]:
                f.write(("%s: %s\r\n" % (k, v)).encode())
            f.write(CRLF + body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-port", type=int, default=8080)
    ap.add_argument("-capture", metavar="DIR", help="write each batch request and answer here")
    args = ap.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.api = UsersAPI()
    srv.capture = args.capture
    srv.counter = itertools.count(1)
    if args.capture:
        os.makedirs(args.capture, exist_ok=True)
    print("mock batch server on http://127.0.0.1:%d" % srv.server_address[1], flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
