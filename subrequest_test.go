package batch

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tidwall/gjson"
	"golang.org/x/crypto/bcrypt"
)

// Two mutually exclusive handle blocks reached by the sub-requests of one
// parallel batch: each sub-request has its own route-group state.
func TestHandleBlocksPerOperation(t *testing.T) {
	base := startCaddy(t, `
	batch /batch {
		mode parallel
	}
	handle /a/* {
		respond "route a {http.request.uri}"
	}
	handle /b/* {
		respond "route b {http.request.uri}"
	}
	handle {
		respond "fallback" 404
	}`)

	var ops []string
	for i := range 20 {
		ops = append(ops, fmt.Sprintf(`{"path":"/%c/%d"}`, "ab"[i%2], i))
	}
	status, _, body := send(t, "POST", base+"/batch", "["+strings.Join(ops, ",")+`,{"path":"/c"}]`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body).Array()
	for i := range 20 {
		want := fmt.Sprintf("route %c /%c/%d", "ab"[i%2], "ab"[i%2], i)
		if got := res[i].Get("body").String(); got != want || res[i].Get("status").Int() != 200 {
			t.Errorf("op %d: %s, want body %q", i, res[i].Raw, want)
		}
	}
	if res[20].Get("status").Int() != 404 || res[20].Get("body").String() != "fallback" {
		t.Errorf("fallback handle: %s", res[20].Raw)
	}
}

// basic_auth after batch authenticates each operation on its own.
func TestBasicAuthPerOperation(t *testing.T) {
	be := newBackend(t)
	hash, err := bcrypt.GenerateFromPassword([]byte("secret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch
	basic_auth /users* {
		alice %s
	}
	reverse_proxy %s`, hash, be.addr()))

	good := "Basic " + b64([]byte("alice:secret"))
	bad := "Basic " + b64([]byte("alice:wrong"))
	status, _, body := send(t, "POST", base+"/batch", fmt.Sprintf(`[
		{"path":"/users","headers":{"Authorization":%q}},
		{"path":"/users","headers":{"Authorization":%q}},
		{"path":"/users"},
		{"path":"/health"}]`, good, bad))
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body).Array()
	for i, want := range []int64{200, 401, 401, 200} {
		if got := res[i].Get("status").Int(); got != want {
			t.Errorf("op %d: status %d, want %d: %s", i, got, want, res[i].Raw)
		}
	}
	if res[1].Get("headers.Www-Authenticate").String() == "" {
		t.Errorf("401 must keep WWW-Authenticate: %s", res[1].Raw)
	}
	// The batch's own Authorization is inherited by its operations.
	status, _, body = send(t, "POST", base+"/batch", `[{"path":"/users"}]`, "Authorization: "+good)
	if status != 200 || mustJSON(t, body).Get("0.status").Int() != 200 {
		t.Errorf("inherited Authorization: %d %s", status, body)
	}
	for _, r := range be.requests() {
		if r.Path == "/users" && r.Header.Get("Authorization") != good {
			t.Errorf("backend saw an unauthenticated operation: %+v", r)
		}
	}
}

func TestSubRequestShape(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		allow_forwarded_headers X-Forwarded-Proto
	}
	respond /inherit "ae={http.request.header.Accept-Encoding}|prefer={http.request.header.Prefer}|idem={http.request.header.Idempotency-Key}"
	reverse_proxy %s {
		header_up X-Batch-Id {http.batch.id}
		header_up X-Batch-Index {http.batch.index}
		header_up X-Batch-Op {http.batch.op_id}
	}`, be.addr()))

	status, _, body := send(t, "POST", base+"/batch", `[
		{"id":"json","method":"POST","path":"/echo?a=1&b=%20","headers":{"X-Trace":["t1","t2"],"Accept":"application/x-own"},"body":{"k": [1, 2.50, "é"]}},
		{"id":"text","method":"PUT","path":"/echo","body":"plain text"},
		{"id":"bin","method":"POST","path":"/echo","body":"AP8=","body_encoding":"base64"},
		{"id":"typed","method":"POST","path":"/echo","headers":{"Content-Type":"application/xml"},"body":"<a/>"},
		{"id":"fwd","path":"/echo","headers":{"X-Forwarded-For":"6.6.6.6","X-Real-IP":"6.6.6.6","Forwarded":"for=6.6.6.6","X-Forwarded-Proto":"https"}},
		{"id":"inherit","path":"/inherit"}]`, "Accept: text/html", "Accept-Encoding: br", "Idempotency-Key: k1", "X-Tenant: acme", "Prefer: respond-async", "Authorization: Bearer t0k")
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body).Array()
	echo := func(i int) (gjson.Result, http.Header) {
		t.Helper()
		e := gjson.Parse(res[i].Get("body").Raw)
		h := http.Header{}
		e.Get("headers").ForEach(func(k, v gjson.Result) bool {
			for _, s := range v.Array() {
				h.Add(k.String(), s.String())
			}
			return true
		})
		return e, h
	}

	e, h := echo(0)
	if e.Get("uri").String() != "/echo?a=1&b=%20" || e.Get("method").String() != "POST" {
		t.Errorf("target: %s", e.Raw)
	}
	if e.Get("body").String() != `{"k": [1, 2.50, "é"]}` {
		t.Errorf("JSON body must be sent byte for byte, got %q", e.Get("body").String())
	}
	if h.Get("Content-Type") != "application/json" || e.Get("length").Int() != int64(len(`{"k": [1, 2.50, "é"]}`)) {
		t.Errorf("JSON body headers: %v length %d", h, e.Get("length").Int())
	}
	if got := h.Values("X-Trace"); len(got) != 2 || got[0] != "t1" || got[1] != "t2" {
		t.Errorf("array header values: %v", got)
	}
	if h.Get("Accept") != "application/x-own" {
		t.Errorf("operation headers must override inherited ones: Accept %q", h.Get("Accept"))
	}
	if h.Get("X-Tenant") != "acme" || h.Get("Authorization") != "Bearer t0k" {
		t.Errorf("outer headers not inherited: %v", h)
	}
	if got := res[5].Get("body").String(); got != "ae=|prefer=|idem=" {
		t.Errorf("Accept-Encoding, Prefer and Idempotency-Key must not be inherited: %s", got)
	}
	if h.Get("X-Batch-Id") == "" || len(h.Get("X-Batch-Id")) != 32 || h.Get("X-Batch-Index") != "0" || h.Get("X-Batch-Op") != "json" {
		t.Errorf("placeholders: id %q index %q op %q", h.Get("X-Batch-Id"), h.Get("X-Batch-Index"), h.Get("X-Batch-Op"))
	}
	batchID := h.Get("X-Batch-Id")
	if !strings.HasPrefix(e.Get("host").String(), "127.0.0.1:") {
		t.Errorf("Host: %s", e.Get("host"))
	}

	e, h = echo(1)
	if e.Get("body").String() != "plain text" || h.Get("Content-Type") != "text/plain; charset=utf-8" {
		t.Errorf("string body: %s %v", e.Raw, h)
	}
	if h.Get("X-Batch-Id") != batchID || h.Get("X-Batch-Index") != "1" {
		t.Errorf("operations of one batch share its id and have their own index: %q %q", h.Get("X-Batch-Id"), h.Get("X-Batch-Index"))
	}
	e, h = echo(2)
	if e.Get("body_b64").String() != "AP8=" || h.Get("Content-Type") != "application/octet-stream" {
		t.Errorf("base64 body: %s %v", e.Get("body_b64"), h)
	}
	e, h = echo(3)
	if h.Get("Content-Type") != "application/xml" || e.Get("body").String() != "<a/>" {
		t.Errorf("explicit Content-Type: %v", h)
	}
	_, h = echo(4)
	if xff := h.Get("X-Forwarded-For"); strings.Contains(xff, "6.6.6.6") || h.Get("X-Real-Ip") != "" || h.Get("Forwarded") != "" {
		t.Errorf("an operation spoke for another address: XFF %q X-Real-IP %q Forwarded %q", xff, h.Get("X-Real-Ip"), h.Get("Forwarded"))
	}
	if h.Get("X-Forwarded-For") != "127.0.0.1" {
		t.Errorf("backend must see the real client address, got X-Forwarded-For %q", h.Get("X-Forwarded-For"))
	}
}

func TestPanicsErrorsAndNesting(t *testing.T) {
	base := startCaddy(t, `
	batch /batch /batch/*
	route /panic {
		test_panic
	}
	error /forbidden "no" 403
	respond /ok "fine"
	handle /other-batch {
		batch
	}`)

	status, _, body := send(t, "POST", base+"/batch", `{"mode":"parallel","batch":[
		{"path":"/panic"},{"path":"/forbidden"},{"path":"/batch"},{"path":"/ok"},{"path":"/other-batch"}]}`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body)
	checks := []struct {
		status int64
		err    string
	}{{500, "panicked"}, {403, ""}, {400, "nested batch"}, {200, ""}, {400, "nested batch"}}
	for i, c := range checks {
		r := res.Get(fmt.Sprintf("results.%d", i))
		if r.Get("status").Int() != c.status || !strings.Contains(r.Get("error").String(), c.err) || (c.err == "" && r.Get("error").Exists()) {
			t.Errorf("op %d: %s, want status %d error %q", i, r.Raw, c.status, c.err)
		}
	}
	if res.Get("failed").Int() != 4 || res.Get("succeeded").Int() != 1 {
		t.Errorf("counts: %s", body)
	}
	// The server is still fine.
	if status, _, _ := send(t, "POST", base+"/batch", `[{"path":"/ok"}]`); status != 200 {
		t.Errorf("server broken after a panic: %d", status)
	}
}

// batch runs before root and vars, so a batched file_server request reads
// the root a lone request would.
func TestDirectiveOrderFileServer(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "hello.txt"), []byte("from disk"), 0o644); err != nil {
		t.Fatal(err)
	}
	base := startCaddy(t, fmt.Sprintf(`
	root * %s
	vars who world
	file_server /hello.txt
	respond /vars "hello {vars.who}"
	batch /batch`, dir))
	_, _, body := send(t, "POST", base+"/batch", `[{"path":"/hello.txt"},{"path":"/vars"}]`)
	res := mustJSON(t, body)
	if res.Get("0.body").String() != "from disk" || res.Get("1.body").String() != "hello world" {
		t.Errorf("sub-requests must pass through root and vars: %s", body)
	}
}

// Each backend fault stays with its operation, answered in time, and the
// operations after it run normally.
func TestBackendFaults(t *testing.T) {
	fb := newFaultBackend(t)
	garbage, garbageHits := garbageServer(t)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		op_timeout 300ms
		max_response_size 1MB
	}
	handle /garbage {
		reverse_proxy %s
	}
	handle {
		reverse_proxy %s
	}`, garbage, fb.Listener.Addr()))
	send(t, "POST", base+"/batch", `[{"path":"/ok"}]`) // warm-up
	check := noLeaks(t, fb.Server)

	start := time.Now()
	status, _, body := send(t, "POST", base+"/batch", `{"batch":[
		{"id":"reset","method":"POST","path":"/reset","body":{"a":1}},
		{"id":"ok1","path":"/ok"},
		{"id":"hang","path":"/hang"},
		{"id":"ok2","path":"/ok"},
		{"id":"garbage","path":"/garbage"},
		{"id":"endless","path":"/endless"},
		{"id":"ok3","path":"/ok"}]}`)
	elapsed := time.Since(start)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body)
	t.Logf("batch of faults answered in %v: %s", elapsed.Round(time.Millisecond), body)
	want := []struct {
		status int64
		err    string
	}{{502, ""}, {200, ""}, {504, "operation timed out after 300ms"}, {200, ""}, {502, ""}, {502, "response larger than max_response_size (1000000 bytes)"}, {200, ""}}
	for i, w := range want {
		r := res.Get(fmt.Sprintf("results.%d", i))
		if r.Get("status").Int() != w.status || r.Get("error").String() != w.err {
			t.Errorf("op %s: %s, want status %d error %q", r.Get("id"), r.Raw, w.status, w.err)
		}
	}
	if res.Get("results.5.body").Exists() {
		t.Errorf("a cut-off answer must not be passed on in part: %.200s", res.Get("results.5").Raw)
	}
	if res.Get("succeeded").Int() != 3 || res.Get("failed").Int() != 4 {
		t.Errorf("counts: %s", body)
	}
	// 300ms of op_timeout plus the rest, which is quick.
	if elapsed > 3*time.Second {
		t.Errorf("batch took %v", elapsed)
	}
	if n := fb.resets.Load(); n != 1 {
		t.Errorf("reset op reached the backend %d times, want 1 (no retry of a POST)", n)
	}
	if n := garbageHits.Load(); n != 1 {
		t.Errorf("garbage backend asked %d times, want 1", n)
	}
	if n := fb.oks.Load(); n != 4 { // warm-up and three
		t.Errorf("backend answered %d good requests, want 4", n)
	}
	// The hung request is given up on: the backend sees its client go.
	select {
	case d := <-fb.hangEnded:
		if d > 2*time.Second {
			t.Errorf("hung request held for %v", d)
		}
	case <-time.After(3 * time.Second):
		t.Error("hung backend request was never canceled")
	}
	// The endless answer is cut, not read to its end.
	select {
	case <-fb.endless:
	case <-time.After(3 * time.Second):
		t.Fatalf("endless answer still being read: %d MB so far", fb.streamed.Load()>>20)
	}
	if n := fb.streamed.Load(); n > 32<<20 {
		t.Errorf("backend wrote %d MB of an endless answer before it was cut; max_response_size is 1 MB", n>>20)
	} else {
		t.Logf("endless answer cut after %d KB written by the backend", n>>10)
	}
	check()
}

// max_response_size bounds the whole answer kept from an operation, headers
// included: a backend cannot make the batch hold (and pass on) megabytes of
// headers under a 1 KB limit.
func TestMaxResponseSizeCountsHeaders(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for i := range 20 {
			w.Header().Set(fmt.Sprintf("X-Pad-%d", i), strings.Repeat("h", 100_000))
		}
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(srv.Close)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		max_response_size 1KB
	}
	reverse_proxy %s`, srv.Listener.Addr()))
	status, _, body := send(t, "POST", base+"/batch", `[{"path":"/"}]`)
	if status != 200 {
		t.Fatalf("status %d", status)
	}
	r := mustJSON(t, body).Get("0")
	if r.Get("status").Int() != 502 || !strings.Contains(r.Get("error").String(), "max_response_size") || len(body) > 10_000 {
		t.Errorf("a 2 MB answer (all headers) under max_response_size 1KB: status %d, error %q, %d KB passed on; want 502 naming max_response_size",
			r.Get("status").Int(), r.Get("error").String(), len(body)>>10)
	}
}

// A panic downstream, even after it wrote part of an answer, fails its own
// operation only; nothing of the half answer is passed on.
func TestDownstreamPanicMidAnswer(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch
	route /panic {
		test_panic
	}
	route /half {
		test_write_panic
	}
	route /abort {
		test_write_panic abort
	}
	reverse_proxy %s`, be.addr()))
	send(t, "POST", base+"/batch", `[{"path":"/health"}]`)
	check := noLeaks(t, be.Server)

	for _, mode := range []string{"sequential", "parallel"} {
		status, hdr, body := send(t, "POST", base+"/batch", `{"mode":"`+mode+`","batch":[
			{"path":"/health"},{"path":"/panic"},{"path":"/half"},{"path":"/abort"},{"method":"POST","path":"/users","body":{"name":"after"}}]}`)
		if status != 200 {
			t.Fatalf("%s: status %d: %s", mode, status, body)
		}
		if hdr.Get("Set-Cookie") != "" {
			t.Errorf("%s: a sub-response header leaked into the batch answer", mode)
		}
		res := mustJSON(t, body)
		want := []struct {
			status int64
			err    string
		}{{200, ""}, {500, "handler panicked"}, {500, "handler panicked"}, {502, "response was cut off"}, {201, ""}}
		for i, w := range want {
			r := res.Get(fmt.Sprintf("results.%d", i))
			if r.Get("status").Int() != w.status || r.Get("error").String() != w.err {
				t.Errorf("%s op %d: %s, want status %d error %q", mode, i, r.Raw, w.status, w.err)
			}
			if w.err != "" && (r.Get("body").Exists() || r.Get("headers").Exists()) {
				t.Errorf("%s op %d: half an answer passed on: %s", mode, i, r.Raw)
			}
		}
	}
	var got []string
	for _, r := range be.requests() {
		got = append(got, r.Method+" "+r.Path)
	}
	slices.Sort(got) // the parallel batch reaches the backend in any order
	if want := "[GET /health GET /health GET /health POST /users POST /users]"; fmt.Sprint(got) != want {
		t.Errorf("backend saw %v, want %s", got, want)
	}
	if status, _, _ := send(t, "POST", base+"/batch", `[{"path":"/health"}]`); status != 200 {
		t.Errorf("server broken after panics: %d", status)
	}
	check()
}

// forward_auth after batch asks the auth service about each operation on its
// own, with that operation's method, URI and headers; operations it refuses
// never reach the backend, and the identity it hands down cannot be forged.
func TestForwardAuthPerOperation(t *testing.T) {
	auth := newRecorder(t, func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("X-Api-Key") == "good" {
			w.Header().Set("X-User", "alice")
			w.WriteHeader(http.StatusOK)
			return true
		}
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = io.WriteString(w, "denied")
		return true
	})
	be := newRecorder(t, nil)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch
	forward_auth %s {
		uri /check
		copy_headers X-User
	}
	reverse_proxy %s`, auth.Listener.Addr(), be.Listener.Addr()))

	status, _, body := send(t, "POST", base+"/batch", `[
		{"path":"/a?x=1","headers":{"X-Api-Key":"good"}},
		{"path":"/b"},
		{"path":"/c","headers":{"X-Api-Key":"bad","X-User":"root"}},
		{"method":"POST","path":"/d","headers":{"X-Api-Key":"good","X-User":"root"},"body":"payload"}]`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body).Array()
	for i, w := range []struct {
		status int64
		body   string
	}{{200, "GET /a?x=1 "}, {401, "denied"}, {401, "denied"}, {200, "POST /d payload"}} {
		if res[i].Get("status").Int() != w.status || res[i].Get("body").String() != w.body {
			t.Errorf("op %d: %s, want %d %q", i, res[i].Raw, w.status, w.body)
		}
	}
	asked := auth.requests()
	if len(asked) != 4 {
		t.Fatalf("auth service asked %d times, want once per operation", len(asked))
	}
	for i, want := range []string{"GET /a?x=1", "GET /b", "GET /c", "POST /d"} {
		got := asked[i].Header.Get("X-Forwarded-Method") + " " + asked[i].Header.Get("X-Forwarded-Uri")
		if got != want || !strings.HasPrefix(asked[i].Path, "/check") {
			t.Errorf("auth request %d was about %q at %s, want %q", i, got, asked[i].Path, want)
		}
	}
	passed := be.requests()
	if len(passed) != 2 {
		t.Fatalf("backend saw %d requests, want the 2 authorized: %+v", len(passed), passed)
	}
	for _, r := range passed {
		if r.Header.Get("X-User") != "alice" || r.Header.Get("X-Api-Key") != "good" {
			t.Errorf("backend saw %s with X-User %q X-Api-Key %q", r.Path, r.Header.Get("X-User"), r.Header.Get("X-Api-Key"))
		}
	}
}

// rewrite and uri strip_prefix change each operation's own URL, exactly as
// for a lone request, and never the URL another operation starts from.
func TestRewritesPerOperation(t *testing.T) {
	be := newRecorder(t, nil)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		mode parallel
		concurrency 4
	}
	rewrite /old/* /new{path}?from=old&{query}
	uri /api/* strip_prefix /api
	uri /twice/* replace /twice/ /twice/again/
	reverse_proxy %s`, be.Listener.Addr()))

	paths := []string{"/api/users?limit=2", "/old/thing?q=1", "/api/old/x", "/plain"}
	var lone []string
	for _, p := range paths {
		send(t, "GET", base+p, "")
	}
	for _, r := range be.requests() {
		lone = append(lone, r.Path)
	}
	be.reset()

	var ops []string
	for _, p := range paths {
		ops = append(ops, fmt.Sprintf(`{"path":%q}`, p))
	}
	status, _, body := send(t, "POST", base+"/batch", "["+strings.Join(ops, ",")+"]")
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	got := map[string]bool{}
	for _, r := range be.requests() {
		got[r.Path] = true
	}
	for i, want := range lone {
		if !got[want] {
			t.Errorf("op %s: backend saw none of %q, which a lone request makes of it; saw %v", paths[i], want, be.requests())
		}
		if b := mustJSON(t, body).Get(fmt.Sprintf("%d.body", i)).String(); b != "GET "+want+" " {
			t.Errorf("op %d answer %q, want the backend's answer to %s", i, b, want)
		}
	}
	if lone[0] != "/users?limit=2" || lone[1] != "/new/old/thing?from=old&q=1" {
		t.Errorf("Caddyfile rewrites are not what this test means: %v", lone)
	}

	// The items of a bulk batch share one parsed target: a rewrite of one
	// item's URL must not be seen by the next.
	be.reset()
	status, _, body = send(t, "POST", base+"/batch", `{"operation":{"method":"POST","path":"/twice/x"},"items":[1,2,3,4,5,6,7,8]}`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	reqs := be.requests()
	if len(reqs) != 8 {
		t.Fatalf("backend saw %d requests", len(reqs))
	}
	for _, r := range reqs {
		if r.Path != "/twice/again/x" {
			t.Errorf("bulk item reached %s, want /twice/again/x", r.Path)
		}
	}
}

// request_body max_size refuses each operation's body on its own: the one
// too large is 413 and never reaches the backend, the others pass.
func TestRequestBodyLimitPerOperation(t *testing.T) {
	be := newRecorder(t, nil)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch
	request_body {
		max_size 100B
	}
	reverse_proxy %s`, be.Listener.Addr()))

	big := strings.Repeat("b", 101)
	// A lone request, for comparison.
	if status, _ := postBody(t, base+"/lone", []byte(big), false); status != 413 {
		t.Errorf("lone request with a 101-byte body: %d", status)
	}
	status, _, body := send(t, "POST", base+"/batch", fmt.Sprintf(`{"batch":[
		{"method":"POST","path":"/small","body":%q},
		{"method":"POST","path":"/big","body":%q},
		{"method":"PUT","path":"/exact","body":%q},
		{"path":"/none"}]}`, "small", big, strings.Repeat("e", 100)))
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body)
	for i, want := range []int64{200, 413, 200, 200} {
		if got := res.Get(fmt.Sprintf("results.%d.status", i)).Int(); got != want {
			t.Errorf("op %d: %s, want %d", i, res.Get(fmt.Sprintf("results.%d", i)).Raw, want)
		}
	}
	var got []string
	for _, r := range be.requests() {
		got = append(got, fmt.Sprintf("%s %s %d", r.Method, r.Path, len(r.Body)))
	}
	if want := "[POST /small 5 PUT /exact 100 GET /none 0]"; fmt.Sprint(got) != want {
		t.Errorf("backend saw %v, want %s", got, want)
	}
}

// Caddy's standard modules have no request-rate limiter (rate_limit is a
// third-party module); the limit they do have is reverse_proxy's cap on
// requests in flight to an upstream (max_requests, or passive
// unhealthy_request_count). Operations count against it one by one, as
// lone requests do: while the cap is taken, they are refused 503 without
// reaching the backend.
func TestUpstreamRequestCapPerOperation(t *testing.T) {
	var inFlight atomic.Int64
	gate := make(chan struct{})
	be := newRecorder(t, func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == "/hold" {
			inFlight.Add(1)
			defer inFlight.Add(-1)
			select {
			case <-gate:
			case <-r.Context().Done():
			}
		}
		return false
	})
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		mode parallel
	}
	reverse_proxy %s {
		unhealthy_request_count 2
	}`, be.Listener.Addr()))

	// Batch A takes both slots and holds them.
	type answer struct {
		status int
		body   string
	}
	aDone := make(chan answer, 1)
	req := request(t, "POST", base+"/batch", `[{"path":"/hold"},{"path":"/hold"}]`)
	go func() {
		resp, err := client.Do(req)
		if err != nil {
			aDone <- answer{0, err.Error()}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		aDone <- answer{resp.StatusCode, string(b)}
	}()
	for deadline := time.Now().Add(5 * time.Second); inFlight.Load() < 2; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			close(gate)
			t.Fatalf("batch A never held the backend: %d in flight", inFlight.Load())
		}
	}
	before := len(be.requests())

	// Batch B and a lone request are refused while the slots are taken.
	status, _, body := send(t, "POST", base+"/batch", `[{"path":"/b1"},{"path":"/b2"},{"path":"/b3"}]`)
	lone, _, _ := send(t, "GET", base+"/lone", "")
	close(gate)
	a := receive(t, 40*time.Second, "batch A to be answered", aDone)

	if status != 200 {
		t.Fatalf("batch B: %d %s", status, body)
	}
	for i, r := range mustJSON(t, body).Array() {
		if r.Get("status").Int() != 503 {
			t.Errorf("batch B op %d: %s, want 503 while the upstream is full", i, r.Raw)
		}
	}
	if lone != 503 {
		t.Errorf("lone request while the upstream is full: %d, want 503", lone)
	}
	if got := be.requests()[before:]; len(got) != 0 {
		t.Errorf("backend saw %d requests over its cap", len(got))
	}
	if a.status != 200 || mustJSON(t, a.body).Get("#(status==200)#").Raw == "" || len(gjson.Get(a.body, "#(status==200)#").Array()) != 2 {
		t.Errorf("batch A: %d %s", a.status, a.body)
	}
	// Once the slots are free, the same operations pass (one at a time: run
	// in parallel, three operations would find the cap of two full).
	_, _, body = send(t, "POST", base+"/batch", `{"mode":"sequential","batch":[{"path":"/b1"},{"path":"/b2"},{"path":"/b3"}]}`)
	body = gjson.Get(body, "results").Raw
	if n := len(gjson.Get(body, "#(status==200)#").Array()); n != 3 {
		t.Errorf("batch B after the cap freed: %s", body)
	}
}

// An operation whose handlers return an error goes through the server's
// error routes as a lone request does: its result is the lone answer,
// status, headers and body, {err.*} placeholders included.
func TestErrorRoutesPerOperation(t *testing.T) {
	dead := freePort(t) // nothing listens there
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch
	handle /forbidden {
		error "no entry here" 403
	}
	handle /dead {
		reverse_proxy 127.0.0.1:%d
	}
	handle /fine {
		respond "fine"
	}
	handle_errors {
		header X-Error-Page yes
		respond "error {err.status_code} {err.status_text}: {err.message} ({http.request.uri})" {err.status_code}
	}`, dead))
	res := mustJSON(t, mustSend(t, base, `[{"path":"/forbidden"},{"path":"/dead"},{"path":"/fine"}]`))
	for i, path := range []string{"/forbidden", "/dead", "/fine"} {
		status, hdr, lone := send(t, "GET", base+path, "")
		r := res.Get(fmt.Sprint(i))
		if r.Get("status").Int() != int64(status) || r.Get("body").String() != lone ||
			r.Get("headers.X-Error-Page").String() != hdr.Get("X-Error-Page") {
			t.Errorf("%s: lone %d %v %q; as an operation %s", path, status, hdr, lone, r.Raw)
		}
	}
	if !strings.HasPrefix(res.Get("0.body").String(), "error 403 Forbidden: no entry here (/forbidden)") {
		t.Errorf("the error page: %s", res.Get("0").Raw)
	}
}

// mustSend posts a batch and returns its answer, failing unless it is 200.
func mustSend(t *testing.T, base, batch string) string {
	t.Helper()
	status, _, body := send(t, "POST", base+"/batch", batch)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	return body
}

// A header a handler sets without a value (as respond does with
// Content-Type, to keep Go from sniffing one) is on the wire of no lone
// answer, and in no result.
func TestHeaderWithoutValueLeftOut(t *testing.T) {
	base := startCaddy(t, `
	batch /batch
	respond /empty 204`)
	_, hdr, _ := send(t, "GET", base+"/empty", "")
	if _, ok := hdr["Content-Type"]; ok {
		t.Fatalf("the lone answer has a Content-Type: %v", hdr)
	}
	res := mustJSON(t, mustSend(t, base, `[{"path":"/empty"}]`)).Get("0")
	if res.Get("status").Int() != 204 || res.Get("headers.Content-Type").Exists() {
		t.Errorf("the result: %s", res.Raw)
	}
}

// A batch request's own hop-by-hop and upgrade headers are not passed to its
// operations, and a reference cannot smuggle what an operation could not
// say itself.
func TestHostileHeadersAndReferences(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		paths /users /users/* /echo
	}`))

	status, _, body := send(t, "POST", base+"/batch", `[{"path":"/echo"}]`, "Connection: Upgrade, X-Hop", "Upgrade: websocket",
		"Sec-WebSocket-Version: 13", "X-Hop: secret", "Te: trailers", "Proxy-Authorization: Basic c2VjcmV0")
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	seen := be.requests()
	if len(seen) != 1 {
		t.Fatalf("backend saw %d requests", len(seen))
	}
	for _, name := range []string{"Upgrade", "X-Hop", "Te", "Proxy-Authorization"} {
		if v := seen[0].Header.Get(name); v != "" {
			t.Errorf("operation inherited %s: %q", name, v)
		}
	}

	// An answer that holds a path traversal or a header injection, read by
	// a reference, leaves the operation unrun (424).
	status, _, body = send(t, "POST", base+"/batch", `[
		{"id":"mk","method":"POST","path":"/users","body":{"name":"../admin","email":"a\r\nX-Evil: 1"}},
		{"id":"trav","path":"/users/{{mk.body.name}}"},
		{"id":"trav2","path":"/users/x/{{mk.body.name}}"},
		{"id":"inj","path":"/users","headers":{"X-Mail":"{{mk.body.email}}"}}]`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body)
	if res.Get("0.status").Int() != 201 {
		t.Fatalf("setup: %s", res.Get("0").Raw)
	}
	for i, want := range map[int]string{1: "after references, path", 2: "after references, path", 3: "control characters"} {
		r := res.Get(strconv.Itoa(i))
		if r.Get("status").Int() != 424 || !strings.Contains(r.Get("error").String(), want) {
			t.Errorf("op %d: %s, want 424 saying %q", i, r.Raw, want)
		}
	}
	for _, r := range be.requests()[1:] {
		if r.Path != "/users" || r.Method != "POST" {
			t.Errorf("backend saw %s %s from a smuggling reference", r.Method, r.Path)
		}
	}

	// Allowed but odd targets reach the backend exactly as written.
	mark := len(be.requests())
	status, _, body = send(t, "POST", base+"/batch", `[{"path":"/users"},{"method":"post","path":"/users","body":{"name":"x"}},{"path":"/users%2f1"},{"path":"/USERS"}]`)
	if status != 200 {
		t.Fatalf("valid batch: %d %s", status, body)
	}
	var got []string
	for _, r := range be.requests()[mark:] {
		got = append(got, r.Method+" "+r.Path)
	}
	if want := []string{"GET /users", "POST /users", "GET /users%2f1", "GET /USERS"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("backend saw %q, want %q", got, want)
	}
}
