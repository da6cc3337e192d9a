package batch

// Production hardening (issue #6): hostile input, bounded memory, faults of
// the backend and of the client, goroutine hygiene, and proof that
// sub-requests pass through the handlers after batch as lone requests do.
// Every test runs a real Caddy in front of a real backend and checks both the
// answer and what reached the backend.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/tidwall/gjson"
	"go.uber.org/goleak"
)

// startCaddyGlobal is startCaddy with more global options (such as server
// timeouts), which startCaddy's fixed global block cannot take.
func startCaddyGlobal(t *testing.T, global, site string) string {
	t.Helper()
	port := freePort(t)
	return loadCaddy(t, adapt(t, testCaddyfile(t.TempDir(), port, global, site)), port)
}

// noLeaks snapshots the goroutines once Caddy and the backends are warm and
// returns a check that no goroutine started since is still alive.
//
// Idle keep-alive connections are not the batch's, and both the snapshot and
// the check close them rather than ignore them: client.CloseIdleConnections
// ends the test client's persistConn loops and so Caddy's server-side conn
// goroutines; closing the backends' client connections ends reverse_proxy's
// persistConn read/write loops (they see EOF) and the backends' own conn
// goroutines.
//
// One goroutine is ignored: right after each config load Caddy's TLS app
// cleans its storage in the background under a storage lock, and certmagic's
// keepLockfileFresh refreshes that lock; it polls every 5s, so it outlives
// the lock by up to 5s and may start after the snapshot. It belongs to the
// config, not to any batch, and nothing outside certmagic can end it.
func noLeaks(t *testing.T, backends ...*httptest.Server) func() {
	t.Helper()
	quiesce := func() {
		client.CloseIdleConnections()
		for _, b := range backends {
			b.CloseClientConnections()
		}
	}
	quiesce()
	opts := []goleak.Option{
		goleak.IgnoreCurrent(),
		goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.keepLockfileFresh"),
	}
	return func() {
		t.Helper()
		quiesce()
		goleak.VerifyNone(t, opts...)
	}
}

// postBody sends a batch body that may hold any bytes; chunked sends it
// without Content-Length.
func postBody(t *testing.T, url string, body []byte, chunked bool) (int, string) {
	t.Helper()
	var r io.Reader = bytes.NewReader(body)
	if chunked {
		r = io.MultiReader(r) // unknown length: the client sends it chunked
	}
	req, err := http.NewRequest(http.MethodPost, url, r)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if chunked && req.ContentLength != 0 {
		t.Fatal("request is not chunked")
	}
	status, _, resp := do(t, req)
	return status, resp
}

// hostileSite is batch with tight limits in front of the backend.
func hostileSite(be *backend) string {
	return proxySite(be, `{
		max_ops 5
		max_body_size 1MB
		methods GET POST
		paths /users /users/*
	}`)
}

// Hostile batches are refused as a whole, with a status and a message that
// name the problem, and nothing of them reaches the backend.
func TestHostileBatchesRefused(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, hostileSite(be))

	op := func(fields string) string { return `[{"method":"GET",` + fields + `}]` }
	cases := []struct {
		name, body string
		status     int
		want       []string // substrings of the faults, in order; for a 413 of its error
	}{
		// Smuggling through operation headers.
		{"header CRLF", op(`"path":"/users","headers":{"X-A":"a\r\nContent-Length: 0\r\n\r\nGET /admin HTTP/1.1"}`), 400,
			[]string{"header X-A has a value with control characters"}},
		{"header bare LF", op(`"path":"/users","headers":{"X-A":"a\nHost: evil"}`), 400, []string{"header X-A has a value with control characters"}},
		{"header bare CR", op(`"path":"/users","headers":{"X-A":"a\rHost: evil"}`), 400, []string{"header X-A has a value with control characters"}},
		{"header NUL", op(`"path":"/users","headers":{"X-A":"a\u0000b"}`), 400, []string{"header X-A has a value with control characters"}},
		{"header obs-fold", op(`"path":"/users","headers":{"X-A":"a\r\n b"}`), 400, []string{"header X-A has a value with control characters"}},
		{"header CRLF in array value", op(`"path":"/users","headers":{"X-A":["ok","a\r\nX-B: b"]}`), 400, []string{"header X-A has a value with control characters"}},
		{"header name with colon", op(`"path":"/users","headers":{"X-A: b\r\nHost":"evil"}`), 400, []string{`header name "X-A: b\r\nHost" is not a valid token`}},
		{"header name with space", op(`"path":"/users","headers":{"Transfer-Encoding ":"chunked"}`), 400, []string{`header name "Transfer-Encoding " is not a valid token`}},
		{"duplicate Content-Length", op(`"path":"/users","headers":{"Content-Length":"0","content-length":"50"}`), 400,
			[]string{"header Content-Length may not be set", "header Content-Length may not be set"}},
		{"Content-Length twice in one value", op(`"path":"/users","headers":{"Content-Length":["0","50"]}`), 400, []string{"header Content-Length may not be set"}},
		{"Transfer-Encoding", op(`"path":"/users","headers":{"Transfer-Encoding":"chunked"}`), 400, []string{"header Transfer-Encoding may not be set"}},
		{"Transfer-Encoding odd case", op(`"path":"/users","headers":{"tRANSFER-eNCODING":"chunked"}`), 400, []string{"header Transfer-Encoding may not be set"}},
		{"Transfer-Encoding lower case", op(`"path":"/users","headers":{"transfer-encoding":"identity"}`), 400, []string{"header Transfer-Encoding may not be set"}},
		{"TE and Trailer", op(`"path":"/users","headers":{"TE":"trailers","Trailer":"X-A"}`), 400,
			[]string{"header Te may not be set", "header Trailer may not be set"}},
		{"Host", op(`"path":"/users","headers":{"host":"admin.internal"}`), 400, []string{"header Host may not be set"}},
		{"duplicate header name", op(`"path":"/users","headers":{"X-Role":"user","x-role":"admin"}`), 400, []string{"header X-Role given twice"}},

		// Smuggling through the path.
		{"path CRLF", op(`"path":"/users HTTP/1.1\r\nHost: evil\r\n\r\nGET /admin"`), 400, []string{"path must not hold control characters or spaces"}},
		{"path LF", op(`"path":"/users\n/admin"`), 400, []string{"path must not hold control characters or spaces"}},
		{"path NUL", op(`"path":"/users\u0000/admin"`), 400, []string{"path must not hold control characters or spaces"}},
		{"path tab", op(`"path":"/users\t"`), 400, []string{"path must not hold control characters or spaces"}},
		{"path encoded CRLF", op(`"path":"/users%0d%0aHost:%20evil"`), 400, []string{"path must not encode control characters"}},
		{"path encoded NUL", op(`"path":"/users/1%00.json"`), 400, []string{"path must not encode control characters"}},
		{"path bad escape", op(`"path":"/users/%zz"`), 400, []string{"invalid percent-escape"}},

		// Targets that are not origin-form.
		{"absolute-form", op(`"path":"http://admin.internal/users"`), 400, []string{`path must be origin-form, got "http://admin.internal/users"`}},
		{"absolute-form upper case", op(`"path":"HTTPS://admin.internal/users"`), 400, []string{"path must be origin-form"}},
		{"authority-form", op(`"path":"admin.internal:443"`), 400, []string{`path must be origin-form, got "admin.internal:443"`}},
		{"network-path", op(`"path":"//admin.internal/users"`), 400, []string{"path must be origin-form"}},
		{"asterisk-form", op(`"path":"*"`), 400, []string{`path must be origin-form, got "*"`}},
		{"relative", op(`"path":"users"`), 400, []string{"path must be origin-form"}},
		{"no path", `[{"method":"GET"}]`, 400, []string{"path is required"}},

		// Dot-segments, raw and encoded.
		{"dotdot", op(`"path":"/users/../admin"`), 400, []string{"path must not hold dot-segments"}},
		{"dotdot at end", op(`"path":"/users/1/.."`), 400, []string{"path must not hold dot-segments"}},
		{"dot", op(`"path":"/users/./1"`), 400, []string{"path must not hold dot-segments"}},
		{"encoded dotdot", op(`"path":"/users/%2e%2e/admin"`), 400, []string{"path must not hold dot-segments"}},
		{"encoded dotdot mixed case", op(`"path":"/users/%2E%2e/admin"`), 400, []string{"path must not hold dot-segments"}},
		{"half-encoded dotdot", op(`"path":"/users/.%2e/admin"`), 400, []string{"path must not hold dot-segments"}},
		{"double-encoded dotdot", op(`"path":"/users/%252e%252e/admin"`), 400, []string{"path must not hold dot-segments"}},
		{"triple-encoded dotdot", op(`"path":"/users/%25252e%25252e/admin"`), 400, []string{"path must not hold dot-segments"}},
		{"dotdot with path parameter", op(`"path":"/users/..;/admin"`), 400, []string{"path must not hold dot-segments"}},
		{"encoded dotdot with path parameter", op(`"path":"/users/%2e%2e;x=1/admin"`), 400, []string{"path must not hold dot-segments"}},

		// Bypass attempts of "paths /users /users/*".
		{"outside paths", op(`"path":"/admin"`), 400, []string{`path "/admin" is not allowed here`}},
		{"case trick", op(`"path":"/ADMIN/users"`), 400, []string{`path "/ADMIN/users" is not allowed here`}},
		{"prefix without slash", op(`"path":"/users-admin"`), 400, []string{`path "/users-admin" is not allowed here`}},
		{"prefix glued", op(`"path":"/usersadmin"`), 400, []string{"is not allowed here"}},
		{"trailing dot", op(`"path":"/admin."`), 400, []string{`path "/admin." is not allowed here`}},
		{"trailing dots on prefix", op(`"path":"/users../admin"`), 400, []string{"is not allowed here"}},
		{"encoded slash into admin", op(`"path":"/%2fadmin"`), 400, []string{`path "//admin" is not allowed here`}},
		{"encoded slash dotdot", op(`"path":"/users%2f..%2fadmin"`), 400, []string{"path must not hold dot-segments"}},
		{"encoded slash dotdot upper", op(`"path":"/users/..%2Fadmin"`), 400, []string{"path must not hold dot-segments"}},
		{"double-encoded slash dotdot", op(`"path":"/users%252f..%252fadmin"`), 400, []string{"path must not hold dot-segments"}},
		{"double slash dotdot", op(`"path":"/users//..//admin"`), 400, []string{"path must not hold dot-segments"}},
		{"double slash", op(`"path":"//users/../admin"`), 400, []string{"path must be origin-form"}},
		{"backslash", op(`"path":"/users\\..\\admin"`), 400, []string{`path must not hold '\'`}},
		{"encoded backslash", op(`"path":"/users/..%5cadmin"`), 400, []string{`path must not encode control characters or '\'`}},
		{"dotdot case trick", op(`"path":"/USERS/../Admin"`), 400, []string{"path must not hold dot-segments"}},
		{"fragment", op(`"path":"/users#/../admin"`), 400, []string{"path must not hold a fragment"}},

		// Methods.
		{"method outside methods", `[{"path":"/users/1","method":"DELETE"}]`, 400, []string{"method DELETE is not allowed here"}},
		{"method lower case", `[{"path":"/users/1","method":"delete"}]`, 400, []string{"method DELETE is not allowed here"}},
		{"method mixed case", `[{"path":"/users/1","method":"pUt"}]`, 400, []string{"method PUT is not allowed here"}},
		{"method CONNECT", `[{"path":"/users","method":"CONNECT"}]`, 400, []string{"method CONNECT is not allowed here"}},
		{"method TRACE", `[{"path":"/users","method":"TRACE"}]`, 400, []string{"method TRACE is not allowed here"}},
		{"method request line", `[{"path":"/users","method":"GET /admin HTTP/1.1\r\nX:"}]`, 400, []string{"is not a valid HTTP method"}},
		{"method with space", `[{"path":"/users","method":"GET "}]`, 400, []string{`method "GET " is not a valid HTTP method`}},
		{"method empty", `[{"path":"/users","method":""}]`, 400, []string{`method "" is not a valid HTTP method`}},
		{"method not a string", `[{"path":"/users","method":1}]`, 400, []string{"method must be a string"}},

		// Upgrades.
		{"websocket", op(`"path":"/users","headers":{"Upgrade":"websocket","Connection":"Upgrade","Sec-WebSocket-Key":"dGhlIHNhbXBsZSBub25jZQ==","Sec-WebSocket-Version":"13"}`), 400,
			[]string{"header Upgrade may not be set", "header Connection may not be set"}},
		{"h2c upgrade lower case", op(`"path":"/users","headers":{"connection":"Upgrade, HTTP2-Settings","upgrade":"h2c"}`), 400,
			[]string{"header Connection may not be set", "header Upgrade may not be set"}},
		{"keep-alive and proxy headers", op(`"path":"/users","headers":{"Keep-Alive":"timeout=600","Proxy-Connection":"keep-alive"}`), 400,
			[]string{"header Keep-Alive may not be set", "header Proxy-Connection may not be set"}},

		// Duplicate JSON keys: parsers disagree on which one wins.
		{"envelope batch twice", `{"batch":[{"path":"/users"}],"batch":[{"path":"/admin"}]}`, 400, []string{`field "batch" given twice`}},
		{"envelope batch and requests", `{"batch":[{"path":"/users"}],"requests":[{"path":"/admin"}]}`, 400, []string{`field "requests" given twice`}},
		{"envelope mode twice", `{"mode":"sequential","mode":"parallel","batch":[{"path":"/users"}]}`, 400, []string{`field "mode" given twice`}},
		{"envelope atomicity twice", `{"atomicity":"all_or_nothing","atomicity":"none","batch":[{"path":"/users"}]}`, 400, []string{`field "atomicity" given twice`}},
		{"op path twice", `[{"path":"/users","path":"/admin"}]`, 400, []string{`field "path" given twice`}},
		{"op path and url", `[{"path":"/users","url":"/admin"}]`, 400, []string{`field "url" given twice (or with an alias)`}},
		{"op path escaped key", `[{"path":"/users","pa\u0074h":"/admin"}]`, 400, []string{`field "path" given twice`}},
		{"op method twice", `[{"method":"GET","method":"DELETE","path":"/users"}]`, 400, []string{`field "method" given twice`}},
		{"op id and name", `[{"id":"a","name":"b","path":"/users"}]`, 400, []string{`field "name" given twice (or with an alias)`}},

		// Encoding and shape.
		{"invalid UTF-8", "[{\"path\":\"/users\",\"body\":\"\xff\xfe\"}]", 400, []string{"batch is not valid UTF-8"}},
		{"overlong UTF-8 dot", "[{\"path\":\"/users/\xc0\xae\xc0\xae/admin\"}]", 400, []string{"batch is not valid UTF-8"}},
		{"deep arrays", strings.Repeat("[", 100000), 400, []string{"batch nests JSON deeper than 64 levels"}},
		{"deep objects", strings.Repeat(`{"a":`, 100000), 400, []string{"batch nests JSON deeper than 64 levels"}},
		{"deep body", `[{"method":"POST","path":"/users","body":` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + `}]`, 400,
			[]string{"batch nests JSON deeper than 64 levels"}},
		{"trailing garbage", `[{"path":"/users"}] [{"path":"/admin"}]`, 400, []string{"batch is not valid JSON"}},

		// Size limits: counted before anything is parsed.
		{"many tiny operations", "[" + strings.TrimSuffix(strings.Repeat("{},", 100001), ",") + "]", 413,
			[]string{"batch has 100001 operations, more than the 5 allowed"}},
		{"many items", `{"operation":{"method":"POST","path":"/users"},"items":[` + strings.TrimSuffix(strings.Repeat("1,", 6), ",") + "]}", 413,
			[]string{"batch has 6 operations, more than the 5 allowed"}},
		{"huge field", `[{"method":"POST","path":"/users","body":"` + strings.Repeat("x", 2_000_000) + `"}]`, 413,
			[]string{"batch body is larger than 1000000 bytes"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := len(be.requests())
			status, hdr, body := post(t, base+"/batch", tc.body)
			if status != tc.status {
				t.Fatalf("status %d, want %d: %.300s", status, tc.status, body)
			}
			if hdr.Get("Content-Type") != "application/json" {
				t.Errorf("Content-Type %q", hdr.Get("Content-Type"))
			}
			res := mustJSON(t, body)
			if tc.status == 413 {
				if msg := res.Get("error").String(); !strings.Contains(msg, tc.want[0]) {
					t.Errorf("error %q, want it to say %q", msg, tc.want[0])
				}
			} else {
				faults := res.Get("errors").Array()
				if len(faults) != len(tc.want) {
					t.Fatalf("want %d faults, got %s", len(tc.want), body)
				}
				for i, want := range tc.want {
					if msg := faults[i].Get("message").String(); !strings.Contains(msg, want) {
						t.Errorf("fault %d = %q, want it to say %q", i, msg, want)
					}
				}
			}
			if got := be.requests()[before:]; len(got) != 0 {
				t.Errorf("backend saw %d requests: %+v", len(got), got)
			}
		})
	}

	// A huge body sent chunked, with no Content-Length to refuse it early.
	mark := len(be.requests())
	status, body := postBody(t, base+"/batch", []byte(`[{"method":"POST","path":"/users","body":"`+strings.Repeat("x", 2_000_000)+`"}]`), true)
	if status != 413 || !strings.Contains(mustJSON(t, body).Get("error").String(), "larger than 1000000 bytes") {
		t.Errorf("chunked huge body: %d %.200s", status, body)
	}
	if n := len(be.requests()) - mark; n != 0 {
		t.Errorf("backend saw %d requests from a chunked huge batch", n)
	}

	// The same limits let a well-formed batch through: the refusals above
	// are about the attacks, not a server that refuses everything. Allowed
	// but odd targets reach the backend exactly as written.
	status, _, body2 := post(t, base+"/batch", `[{"path":"/users"},{"method":"post","path":"/users","body":{"name":"x"}},{"path":"/users%2f1"},{"path":"/USERS"}]`)
	if status != 200 {
		t.Fatalf("valid batch: %d %s", status, body2)
	}
	var got []string
	for _, r := range be.requests()[mark:] {
		got = append(got, r.Method+" "+r.Path)
	}
	if want := []string{"GET /users", "POST /users", "GET /users%2f1", "GET /USERS"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("backend saw %q, want %q", got, want)
	}
}

// The 400 that lists the faults of a batch is not a way to make the server
// produce (and hold) many times what the client sent: a body of repeated
// bad fields must not be answered with a fault per repetition.
func TestFaultListBounded(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, hostileSite(be))
	body := `[{"path":"/users",` + strings.Repeat(`"x":0,`, 50_000) + `"y":0}]` // 300 KB
	start := time.Now()
	status, _, answer := post(t, base+"/batch", body)
	t.Logf("%d KB of batch answered %d with %d KB in %v", len(body)>>10, status, len(answer)>>10, time.Since(start).Round(time.Millisecond))
	if status != 400 {
		t.Fatalf("status %d", status)
	}
	if msg := mustJSON(t, answer).Get("errors.0.message").String(); msg != `unknown field "x"` {
		t.Errorf("first fault %q", msg)
	}
	if len(answer) > len(body) {
		t.Errorf("a %d KB batch was answered with %d KB of faults (%d of them): the fault list must be capped",
			len(body)>>10, len(answer)>>10, len(mustJSON(t, answer).Get("errors").Array()))
	}
	if len(be.requests()) != 0 {
		t.Errorf("backend saw %d requests", len(be.requests()))
	}
}

// Faults quote what they refuse cut short: a 2 MB invalid id and 120
// unknown fields of 16 KB once made a 200 MB answer.
func TestFaultEchoesCutShort(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	var sb strings.Builder
	sb.WriteString(`[{"id":"` + strings.Repeat("i", 2<<20) + `","path":"/users/` + strings.Repeat("p", 1<<20) + `/../x"`)
	for i := range 120 {
		fmt.Fprintf(&sb, `,"%s%d":0`, strings.Repeat("f", 16<<10), i)
	}
	sb.WriteString(`}]`)
	status, _, answer := post(t, base+"/batch", sb.String())
	if status != 400 {
		t.Fatalf("status %d", status)
	}
	faults := mustJSON(t, answer).Get("errors").Array()
	if len(answer) > 64<<10 || len(faults) < 100 {
		t.Errorf("%d MB of batch answered with %d KB and %d faults", sb.Len()>>20, len(answer)>>10, len(faults))
	}
	for _, f := range faults {
		if len(f.Get("id").String()) > maxEcho+len("…") || len(f.Get("message").String()) > maxFaultMessage+len("…") {
			t.Fatalf("fault echoes too much: %.300s", f.Raw)
		}
	}
	if len(be.requests()) != 0 {
		t.Errorf("backend saw %d requests", len(be.requests()))
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

	req, _ := http.NewRequest(http.MethodPost, base+"/batch", strings.NewReader(`[{"path":"/echo"}]`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Connection", "Upgrade, X-Hop")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("X-Hop", "secret")
	req.Header.Set("Te", "trailers")
	req.Header.Set("Proxy-Authorization", "Basic c2VjcmV0")
	status, _, body := do(t, req)
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
	status, _, body = post(t, base+"/batch", `[
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
}

// A client that sends headers announcing a 10 MB batch and then trickles it
// is cut off by the server's read_body timeout: the batch answers in time,
// saying why, and nothing runs.
func TestSlowBodyCutOffByReadTimeout(t *testing.T) {
	be := newBackend(t)
	base := startCaddyGlobal(t, `servers {
		timeouts {
			read_body 1s
		}
	}`, proxySite(be, ""))
	host := strings.TrimPrefix(base, "http://")

	conn, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	fmt.Fprintf(conn, "POST /batch HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n[", host)
	stop := make(chan struct{})
	trickled := make(chan int)
	go func() {
		n := 0
		defer func() { trickled <- n }()
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			if _, err := io.WriteString(conn, `{"path":"/users"},`); err != nil {
				return
			}
			n++
		}
	}()
	_ = conn.SetReadDeadline(start.Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	elapsed := time.Since(start)
	close(stop)
	n := <-trickled
	t.Logf("answered after %v, %d pieces trickled", elapsed.Round(time.Millisecond), n)
	if elapsed > 3*time.Second {
		t.Errorf("server took %v to give up on a slow body; read_body is 1s", elapsed)
	}
	if len(be.requests()) != 0 {
		t.Errorf("backend saw %d requests from an unfinished batch", len(be.requests()))
	}
	if err != nil {
		t.Fatalf("no answer, the connection was just dropped: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusRequestTimeout || !strings.Contains(gjson.GetBytes(body, "error").String(), "time") {
		t.Errorf("got %d %q; want 408 with a JSON error that names the timeout", resp.StatusCode, body)
	}
}

// resultCounter counts results in a streamed batch answer without keeping
// it, so that the test's own memory stays out of the measurement.
type resultCounter struct {
	tail      []byte
	n         int64
	results   int
	succeeded int
	last      byte
}

func (c *resultCounter) Write(p []byte) (int, error) {
	joined := append(c.tail, p...)
	count := func(pat string) int {
		k := 0
		for i := 0; ; {
			j := bytes.Index(joined[i:], []byte(pat))
			if j < 0 {
				return k
			}
			if i+j+len(pat) > len(c.tail) { // not counted with the previous write
				k++
			}
			i += j + 1
		}
	}
	c.results += count(`{"id":"`)
	c.succeeded += count(`"status":200`)
	c.tail = append(c.tail[:0], joined[max(0, len(joined)-16):]...)
	c.n += int64(len(p))
	if len(p) > 0 {
		c.last = p[len(p)-1]
	}
	return len(p), nil
}

// liveHeap is the heap in use once garbage is collected.
func liveHeap() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// heapProbe, put in the chain between batch and reverse_proxy, measures the
// live heap after each operation's answer has been captured whole and
// before the batch encodes it: the moment the batch holds most for it.
var heapProbe struct {
	sync.Mutex
	on      bool
	samples []uint64
}

func init() {
	caddy.RegisterModule(heapProbeHandler{})
	httpcaddyfile.RegisterHandlerDirective("test_heap_probe", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		h.Next()
		return heapProbeHandler{}, nil
	})
}

type heapProbeHandler struct{}

func (heapProbeHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.test_heap_probe", New: func() caddy.Module { return new(heapProbeHandler) }}
}

func (heapProbeHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	err := next.ServeHTTP(w, r)
	heapProbe.Lock()
	if heapProbe.on {
		heapProbe.samples = append(heapProbe.samples, liveHeap())
	}
	heapProbe.Unlock()
	return err
}

// A sequential batch streams its results: however many operations it has,
// it holds about one answer at a time, not max_ops of them.
func TestSequentialBatchMemoryBounded(t *testing.T) {
	const (
		maxOps  = 50
		maxResp = 1_000_000 // "1MB" in a Caddyfile is SI
	)
	// The answer's headers count against max_response_size too: leave them 1 KB.
	payload := bytes.Repeat([]byte("x"), maxResp-1000)
	var (
		mu      sync.Mutex
		between []uint64 // live heap as each operation reaches the backend
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		if heapProbe.on {
			// What the batch still holds of operations 0..i-1 as i starts.
			between = append(between, liveHeap())
		}
		mu.Unlock()
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write(payload)
	}))
	t.Cleanup(srv.Close)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		mode sequential
		max_ops %d
		max_response_size 1MB
	}
	route {
		test_heap_probe
		reverse_proxy %s
	}`, maxOps, srv.Listener.Addr()))

	ops := "[" + strings.TrimSuffix(strings.Repeat(`{"path":"/blob"},`, maxOps), ",") + "]"
	send := func(ops string, n int) *resultCounter {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, base+"/batch", strings.NewReader(ops))
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		c := &resultCounter{} // counts the streamed answer without keeping it
		if _, err := io.Copy(c, resp.Body); err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 200 || c.results != n || c.succeeded != n || c.last != ']' {
			t.Fatalf("status %d, %d results, %d succeeded, %d bytes", resp.StatusCode, c.results, c.succeeded, c.n)
		}
		return c
	}
	send(`[{"path":"/blob"}]`, 1) // warm-up: connections, buffer pools, lazily built state

	before := liveHeap()
	heapProbe.Lock()
	heapProbe.on, heapProbe.samples = true, nil
	heapProbe.Unlock()
	c := send(ops, maxOps)
	heapProbe.Lock()
	heapProbe.on = false
	captured := heapProbe.samples
	heapProbe.Unlock()
	mu.Lock()
	defer mu.Unlock()
	if len(between) != maxOps || len(captured) != maxOps {
		t.Fatalf("%d and %d samples, want %d", len(between), len(captured), maxOps)
	}
	// Growth over the heap before the batch: the largest, and the average
	// over the first ten operations after op 0 (which starts before the
	// batch holds anything) and over the last ten.
	growth := func(samples []uint64) (peak, first, last int64) {
		for i, s := range samples {
			g := int64(s) - int64(before)
			peak = max(peak, g)
			switch {
			case i >= 1 && i <= 10:
				first += g / 10
			case i >= len(samples)-10:
				last += g / 10
			}
		}
		return peak, first, last
	}
	held, heldFirst, heldLast := growth(between)
	peak, _, _ := growth(captured)
	t.Logf("answer %d MB; live heap before %.1f MB; between operations +%.1f MB at most (+%.1f on average over the first ten, +%.1f over the last ten); with an answer captured +%.1f MB at most",
		c.n/1e6, float64(before)/1e6, float64(held)/1e6, float64(heldFirst)/1e6, float64(heldLast)/1e6, float64(peak)/1e6)

	// Between operations the batch may hold the buffer that encodes a result
	// and the buffer the HTTP sink copies it into, each about
	// max_response_size ('x' needs no escaping) and up to 1.25x from
	// append's growth: 2.5x. The previous answer's capture buffer may still
	// be reachable for a moment (the samples are bimodal, 1x apart): 3.5x.
	// Add 1.5x for what else is live while a request is in flight in this
	// process (sub-request and proxy state, connection buffers, Caddy's
	// lazily built state): 5x. Holding the answers instead would grow by 1x
	// per operation, to 49x.
	if held > 5*maxResp {
		t.Errorf("between operations the live heap grew up to %.1f MB; bound %d MB", float64(held)/1e6, 5*maxResp/1_000_000)
	}
	// Streaming: what is held does not grow with the operations. Keeping
	// each answer would put the last ten 40 MB above the first ten.
	if heldLast-heldFirst > 2*maxResp {
		t.Errorf("held memory grows with the operations: +%.1f MB over the first ten, +%.1f MB over the last ten", float64(heldFirst)/1e6, float64(heldLast)/1e6)
	}
	// With an operation's answer captured whole: add its buffer (up to 2x,
	// as append grows it by doubling while the answer is small): 7x.
	if peak > 7*maxResp {
		t.Errorf("with an answer captured the live heap grew up to %.1f MB; bound %d MB", float64(peak)/1e6, 7*maxResp/1_000_000)
	}
}

// faultBackend misbehaves on purpose, one way per path, and counts what it
// was asked.
type faultBackend struct {
	*httptest.Server
	resets    atomic.Int64
	hangs     atomic.Int64
	hangEnded chan time.Duration // how long each /hang was kept waiting
	streamed  atomic.Int64       // bytes /endless managed to write
	endless   chan struct{}      // closed-per-request: /endless gave up
	oks       atomic.Int64
}

func newFaultBackend(t *testing.T) *faultBackend {
	t.Helper()
	fb := &faultBackend{hangEnded: make(chan time.Duration, 16), endless: make(chan struct{}, 16)}
	fb.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		switch r.URL.Path {
		case "/reset":
			fb.resets.Add(1)
			conn, _, err := w.(http.Hijacker).Hijack()
			if err != nil {
				return
			}
			if tc, ok := conn.(*net.TCPConn); ok {
				_ = tc.SetLinger(0) // RST rather than FIN
			}
			conn.Close()
		case "/hang":
			fb.hangs.Add(1)
			start := time.Now()
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
			fb.hangEnded <- time.Since(start)
		case "/endless":
			// Gigabytes, unless the reader hangs up first.
			defer func() { fb.endless <- struct{}{} }()
			w.Header().Set("Content-Type", "application/octet-stream")
			chunk := bytes.Repeat([]byte{0xAB}, 64<<10)
			for fb.streamed.Load() < 4<<30 {
				n, err := w.Write(chunk)
				fb.streamed.Add(int64(n))
				if err != nil {
					return
				}
			}
		default:
			fb.oks.Add(1)
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"ok":true}`)
		}
	}))
	t.Cleanup(fb.Close)
	return fb
}

// garbageServer answers every request with bytes that are not HTTP.
func garbageServer(t *testing.T) (addr string, hits *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hits = new(atomic.Int64)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
				br := bufio.NewReader(conn)
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						return
					}
					if line == "\r\n" {
						break
					}
				}
				hits.Add(1)
				_, _ = conn.Write([]byte("SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02garbage, not HTTP\r\n\r\n"))
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String(), hits
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
	post(t, base+"/batch", `[{"path":"/ok"}]`) // warm-up
	check := noLeaks(t, fb.Server)

	start := time.Now()
	status, _, body := post(t, base+"/batch", `{"batch":[
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
	status, _, body := post(t, base+"/batch", `[{"path":"/"}]`)
	if status != 200 {
		t.Fatalf("status %d", status)
	}
	r := mustJSON(t, body).Get("0")
	if r.Get("status").Int() != 502 || !strings.Contains(r.Get("error").String(), "max_response_size") || len(body) > 10_000 {
		t.Errorf("a 2 MB answer (all headers) under max_response_size 1KB: status %d, error %q, %d KB passed on; want 502 naming max_response_size",
			r.Get("status").Int(), r.Get("error").String(), len(body)>>10)
	}
}

// A client that goes away mid-batch stops it: what has not started never
// reaches the backend, and what runs is canceled.
func TestClientDisconnectStopsBatch(t *testing.T) {
	cases := []struct {
		name, body string
		running    []string // ids running when the client leaves
	}{
		{"sequential", `{"mode":"sequential","batch":[{"path":"/slow?d=1ms&id=0"},{"path":"/slow?d=10s&id=1"},{"path":"/slow?d=1ms&id=2"},{"path":"/slow?d=1ms&id=3"}]}`,
			[]string{"1"}},
		{"parallel", `{"mode":"parallel","batch":[` + strings.TrimSuffix(strings.Repeat(`{"path":"/slow?d=10s&id=ID"},`, 6), ",") + `]}`,
			[]string{"0", "1"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			be := newBackend(t)
			base := startCaddy(t, proxySite(be, `{
				concurrency 2
			}`))
			post(t, base+"/batch", `[{"path":"/health"}]`)
			check := noLeaks(t, be.Server)

			body := tc.body
			for i := 0; strings.Contains(body, "id=ID"); i++ {
				body = strings.Replace(body, "id=ID", "id="+strconv.Itoa(i), 1)
			}
			host := strings.TrimPrefix(base, "http://")
			conn, err := net.Dial("tcp", host)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(conn, "POST /batch HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", host, len(body), body)
			waitEvents := func(prefix string, within time.Duration) bool {
				deadline := time.Now().Add(within)
				for time.Now().Before(deadline) {
					seen := map[string]bool{}
					for _, e := range be.eventLog() {
						seen[e] = true
					}
					all := true
					for _, id := range tc.running {
						all = all && seen[prefix+id]
					}
					if all {
						return true
					}
					time.Sleep(5 * time.Millisecond)
				}
				return false
			}
			if !waitEvents("start ", 5*time.Second) {
				t.Fatalf("operations %v never started: %v", tc.running, be.eventLog())
			}
			conn.Close()
			closed := time.Now()
			if !waitEvents("end ", 2*time.Second) {
				t.Errorf("running operations not canceled 2s after the client left: %v", be.eventLog())
			} else {
				t.Logf("running operations canceled %v after the client left", time.Since(closed).Round(time.Millisecond))
			}
			time.Sleep(300 * time.Millisecond) // what is left takes 1ms or starts at once: ample time to start if it were going to
			var want []string
			if tc.name == "sequential" {
				want = append(want, "start 0", "end 0")
			}
			for _, id := range tc.running {
				want = append(want, "start "+id, "end "+id)
			}
			got := be.eventLog()
			slices.Sort(got)
			slices.Sort(want)
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("backend events %v, want %v: an operation started after the client left", got, want)
			}
			check()
		})
	}
}

// Test-only handlers that fail after writing part of an answer.
func init() {
	caddy.RegisterModule(writePanicHandler{})
	httpcaddyfile.RegisterHandlerDirective("test_write_panic", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		h.Next()
		abort := h.NextArg() && h.Val() == "abort"
		return writePanicHandler{Abort: abort}, nil
	})
}

// writePanicHandler writes a header and part of a body, then panics; with
// Abort, with http.ErrAbortHandler, as reverse_proxy does mid-stream.
type writePanicHandler struct {
	Abort bool `json:"abort,omitempty"`
}

func (writePanicHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.test_write_panic", New: func() caddy.Module { return new(writePanicHandler) }}
}

func (h writePanicHandler) ServeHTTP(w http.ResponseWriter, _ *http.Request, _ caddyhttp.Handler) error {
	w.Header().Set("Set-Cookie", "half=1")
	w.WriteHeader(http.StatusCreated)
	_, _ = io.WriteString(w, `{"partial":`)
	if h.Abort {
		panic(http.ErrAbortHandler)
	}
	panic(errors.New("boom after writing"))
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
	post(t, base+"/batch", `[{"path":"/health"}]`)
	check := noLeaks(t, be.Server)

	for _, mode := range []string{"sequential", "parallel"} {
		status, hdr, body := post(t, base+"/batch", `{"mode":"`+mode+`","batch":[
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
	if status, _, _ := post(t, base+"/batch", `[{"path":"/health"}]`); status != 200 {
		t.Errorf("server broken after panics: %d", status)
	}
	check()
}

// No goroutine started for a batch outlives it, whether it runs one
// operation at a time or many, and whether operations finish or time out.
func TestNoGoroutineOutlivesBatch(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		op_timeout 200ms
		concurrency 4
	}`))
	cases := []struct {
		name, body string
		want       []int64
	}{
		{"sequential", `{"mode":"sequential","batch":[{"path":"/health"},{"method":"POST","path":"/users","body":{"name":"a"}},{"path":"/slow?d=20ms"},{"path":"/users/1"}]}`,
			[]int64{200, 201, 200, 200}},
		{"parallel", `{"mode":"parallel","batch":[` + strings.TrimSuffix(strings.Repeat(`{"path":"/slow?d=20ms"},`, 10), ",") + `]}`,
			[]int64{200, 200, 200, 200, 200, 200, 200, 200, 200, 200}},
		{"op timeout", `{"mode":"sequential","batch":[{"path":"/slow?d=10s"},{"path":"/health"}]}`, []int64{504, 200}},
		{"op timeout parallel", `{"mode":"parallel","batch":[{"path":"/slow?d=10s"},{"path":"/slow?d=10s"},{"path":"/slow?d=10s"},{"path":"/slow?d=10s"},{"path":"/slow?d=10s"},{"path":"/health"}]}`,
			[]int64{504, 504, 504, 504, 504, 200}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			post(t, base+"/batch", `[{"path":"/health"}]`) // warm-up
			check := noLeaks(t, be.Server)
			status, _, body := post(t, base+"/batch", tc.body)
			if status != 200 {
				t.Fatalf("status %d: %s", status, body)
			}
			res := mustJSON(t, body).Get("results").Array()
			for i, w := range tc.want {
				if res[i].Get("status").Int() != w {
					t.Errorf("op %d: %s, want %d", i, res[i].Raw, w)
				}
			}
			check()
		})
	}
}

// recorder is a backend that answers 200 with what it got and logs it.
type recorder struct {
	*httptest.Server
	mu   sync.Mutex
	reqs []seen
}

func newRecorder(t *testing.T, answer func(w http.ResponseWriter, r *http.Request) bool) *recorder {
	t.Helper()
	rec := &recorder{}
	rec.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		rec.mu.Lock()
		rec.reqs = append(rec.reqs, seen{Method: r.Method, Path: r.URL.RequestURI(), Header: r.Header.Clone(), Body: body})
		rec.mu.Unlock()
		if answer != nil && answer(w, r) {
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "%s %s %s", r.Method, r.URL.RequestURI(), body)
	}))
	t.Cleanup(rec.Close)
	return rec
}

func (rec *recorder) requests() []seen {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([]seen(nil), rec.reqs...)
}

func (rec *recorder) reset() {
	rec.mu.Lock()
	rec.reqs = nil
	rec.mu.Unlock()
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

	status, _, body := post(t, base+"/batch", `[
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
		get(t, base+p)
	}
	for _, r := range be.requests() {
		lone = append(lone, r.Path)
	}
	be.reset()

	var ops []string
	for _, p := range paths {
		ops = append(ops, fmt.Sprintf(`{"path":%q}`, p))
	}
	status, _, body := post(t, base+"/batch", "["+strings.Join(ops, ",")+"]")
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
	status, _, body = post(t, base+"/batch", `{"operation":{"method":"POST","path":"/twice/x"},"items":[1,2,3,4,5,6,7,8]}`)
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
	status, _, body := post(t, base+"/batch", fmt.Sprintf(`{"batch":[
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
	go func() {
		req, _ := http.NewRequest(http.MethodPost, base+"/batch", strings.NewReader(`[{"path":"/hold"},{"path":"/hold"}]`))
		req.Header.Set("Content-Type", "application/json")
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
	status, _, body := post(t, base+"/batch", `[{"path":"/b1"},{"path":"/b2"},{"path":"/b3"}]`)
	lone, _, _ := get(t, base+"/lone")
	close(gate)
	a := <-aDone

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
	_, _, body = post(t, base+"/batch", `{"mode":"sequential","batch":[{"path":"/b1"},{"path":"/b2"},{"path":"/b3"}]}`)
	body = gjson.Get(body, "results").Raw
	if n := len(gjson.Get(body, "#(status==200)#").Array()); n != 3 {
		t.Errorf("batch B after the cap freed: %s", body)
	}
}
