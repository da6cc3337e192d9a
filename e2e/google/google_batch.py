#!/usr/bin/python3
"""The Google API Python client's BatchHttpRequest (Debian's python3-googleapi,
1.7.12) against caddy-batch's multipart/mixed format, in front of
examples/legacyapi's users API.

    /usr/bin/python3 google_batch.py http://127.0.0.1:8080/batch [API_ROOT]

No discovery document: each HttpRequest is built the way discovery.py's
generated methods build theirs (JsonModel.request for the headers, query and
body; JsonModel.response as the postproc), with an httplib2.Http of its own
(no proxy). API_ROOT, the URL the operations' paths hang off, defaults to the
batch URL's origin, so a request line reads "GET /users/1?alt=json HTTP/1.1".

Exits 0 when every callback got what it should, once; 1 with a message on the
first mismatch; 2 on bad usage.
"""

import json
import sys
from urllib.parse import urljoin, urlsplit

import httplib2
from googleapiclient.errors import HttpError
from googleapiclient.http import BatchHttpRequest, HttpRequest
from googleapiclient.model import JsonModel

checks = 0


def fail(message, extra=None):
    print("FAIL google: " + message, file=sys.stderr)
    if extra is not None:
        print(extra if isinstance(extra, str) else json.dumps(extra, indent=2, default=str), file=sys.stderr)
    sys.exit(1)


def expect(cond, message, extra=None):
    global checks
    if not cond:
        fail(message, extra)
    checks += 1


class Client:
    def __init__(self, batch_uri, api_root):
        self.batch_uri = batch_uri
        self.api_root = api_root
        # proxy_info=None: httplib2 reads http_proxy from the environment by default.
        self.http = httplib2.Http(timeout=30, proxy_info=None)
        self.model = JsonModel(data_wrapper=False)
        self.seen = {}  # request id -> (status, headers) of the part, recorded by postproc

    def request(self, rid, method, path, body=None):
        """An HttpRequest as a discovery-built method makes it."""
        headers, _, query, body = self.model.request({}, {}, {}, body)
        uri = urljoin(self.api_root, path.lstrip("/")) + query

        def postproc(resp, content):
            self.seen[rid] = (resp.status, dict(resp))
            return self.model.response(resp, content)

        return HttpRequest(self.http, postproc, uri, method=method, body=body, headers=headers)

    def run(self, what, ops):
        """Sends ops [(id, method, path, body)] in one batch; returns {id: [(response, exception)]}."""
        calls, overall = {}, []

        def callback(rid, response, exception):
            calls.setdefault(rid, []).append((response, exception))

        batch = BatchHttpRequest(callback=lambda *a: overall.append(a[0]), batch_uri=self.batch_uri)
        for rid, method, path, body in ops:
            batch.add(self.request(rid, method, path, body), callback=callback, request_id=rid)
        try:
            batch.execute(http=self.http)
        except HttpError as e:
            fail("%s: the batch POST answered %s" % (what, e.resp.status), e.content.decode("utf-8", "replace"))
        except Exception as e:  # transport errors; BatchError, KeyError (a part missing), ValueError, IndexError (a part it cannot read)
            fail("%s: the batch failed: %s: %s" % (what, type(e).__name__, e))
        ids = [op[0] for op in ops]
        for rid in ids:
            n = len(calls.get(rid, []))
            expect(n == 1, "%s: callback for %r called %d times, want once" % (what, rid, n))
        expect(sorted(overall) == sorted(ids), "%s: batch callback saw %r, want %r" % (what, overall, ids))
        expect(set(calls) == set(ids), "%s: callbacks for unknown ids %r" % (what, set(calls) - set(ids)))
        return {rid: calls[rid][0] for rid in ids}


def ok(results, rid, status, client):
    response, exception = results[rid]
    if exception is not None:
        fail("%s: HttpError %s, want %d" % (rid, exception.resp.status, status), exception.content.decode("utf-8", "replace"))
    got = client.seen.get(rid, (None, {}))[0]
    expect(got == status, "%s: status %s, want %d" % (rid, got, status))
    return response


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    batch_uri = sys.argv[1]
    u = urlsplit(batch_uri)
    api_root = sys.argv[2] if len(sys.argv) == 3 else "%s://%s/" % (u.scheme, u.netloc)
    if not api_root.endswith("/"):
        api_root += "/"
    c = Client(batch_uri, api_root)

    # 1. Two seed users: one to read, one to delete.
    r = c.run("seed batch", [
        ("seed-keep", "POST", "/users", {"name": "Keep", "email": "keep@example.com", "balance": 3}),
        ("seed-drop", "POST", "/users", {"name": "Drop", "balance": 4}),
    ])
    keep = ok(r, "seed-keep", 201, c)
    drop = ok(r, "seed-drop", 201, c)
    expect(isinstance(keep, dict) and keep.get("name") == "Keep" and isinstance(keep.get("id"), int), "seed-keep: body", keep)
    expect(isinstance(drop, dict) and drop.get("name") == "Drop" and isinstance(drop.get("id"), int), "seed-drop: body", drop)
    K, D = keep["id"], drop["id"]
    missing = max(K, D) + 100000

    # 2. The batch under test. No operation depends on another: Google runs
    # the parts of a batch in any order, and the clients are written so.
    r = c.run("main batch", [
        ("get", "GET", "/users/%d" % K, None),
        ("create", "POST", "/users", {"name": "Ada", "email": "ada@example.com", "balance": 12}),
        ("delete", "DELETE", "/users/%d" % D, None),
        ("missing", "GET", "/users/%d" % missing, None),
        ("update", "PUT", "/users/%d" % K, {"name": "Kept", "balance": 30}),
        ("health", "GET", "/health", None),
    ])
    got = ok(r, "get", 200, c)
    expect(got.get("id") == K and got.get("email") == "keep@example.com", "get: body", got)

    created = ok(r, "create", 201, c)
    expect(created.get("name") == "Ada" and created.get("balance") == 12 and isinstance(created.get("id"), int), "create: body", created)
    loc = c.seen["create"][1].get("location")
    expect(loc == "/users/%d" % created["id"], "create: Location %r, want /users/%d" % (loc, created["id"]))

    gone = ok(r, "delete", 204, c)
    expect(gone == {}, "delete: JsonModel gives {} for a 204, got %r" % (gone,))

    response, exception = r["missing"]
    expect(response is None and isinstance(exception, HttpError), "missing: want an HttpError, got %r / %r" % (response, exception))
    expect(exception.resp.status == 404, "missing: status %s, want 404" % exception.resp.status)
    try:
        body = json.loads(exception.content.decode("utf-8"))
    except ValueError:
        fail("missing: the 404 body is not JSON", exception.content.decode("utf-8", "replace"))
    expect(body == {"error": "no such user"}, "missing: body", body)
    expect(exception.uri.endswith("/users/%d?alt=json" % missing), "missing: HttpError.uri %r" % exception.uri)

    updated = ok(r, "update", 200, c)
    expect(updated == {"id": K, "name": "Kept", "balance": 30}, "update: body", updated)

    health = ok(r, "health", 200, c)
    expect(health == {"status": "ok"}, "health: body", health)

    # 3. What the batch did is what a lone request sees: D is gone, Ada is there.
    r = c.run("check batch", [
        ("dropped", "GET", "/users/%d" % D, None),
        ("ada", "GET", "/users/%d" % created["id"], None),
    ])
    response, exception = r["dropped"]
    expect(isinstance(exception, HttpError) and exception.resp.status == 404, "dropped: user %d still there" % D, response)
    ada = ok(r, "ada", 200, c)
    expect(ada.get("name") == "Ada", "ada: body", ada)

    print("google: every callback from %s as expected" % batch_uri)
    print("google: %d passed, 0 failed" % checks)


if __name__ == "__main__":
    main()
