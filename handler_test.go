package batch

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tidwall/gjson"
	"golang.org/x/crypto/bcrypt"
)

// proxySite is batch in front of reverse_proxy to the backend, as users run it.
func proxySite(b *backend, batchBlock string) string {
	return fmt.Sprintf(`
	batch /batch /batch/* %s
	reverse_proxy %s`, batchBlock, b.addr())
}

func TestSpecExampleThroughReverseProxy(t *testing.T) {
	be := newBackend(t)
	be.seed("Old", "Gone") // ids 1 and 2
	base := startCaddy(t, proxySite(be, ""))

	status, hdr, body := post(t, base+"/batch", `[
		{"method":"POST","path":"/users","body":{"name":"Alice"}},
		{"method":"PUT","path":"/users/1","body":{"name":"Old","email":"new@mail.com"}},
		{"method":"DELETE","path":"/users/2"}]`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	if ct := hdr.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	if hdr.Get("Location") != "" {
		t.Errorf("a sub-response header leaked into the batch response: Location %q", hdr.Get("Location"))
	}
	res := mustJSON(t, body)
	if !res.IsArray() || len(res.Array()) != 3 {
		t.Fatalf("want a bare array of 3 results, got %s", body)
	}
	want := []struct {
		id     string
		status int64
	}{{"0", 201}, {"1", 200}, {"2", 204}}
	for i, w := range want {
		r := res.Array()[i]
		if r.Get("id").String() != w.id || r.Get("status").Int() != w.status {
			t.Errorf("result %d = %s, want id %s status %d", i, r.Raw, w.id, w.status)
		}
	}
	if got := res.Get("0.body.name").String(); got != "Alice" {
		t.Errorf("JSON body not kept as JSON: %s", res.Get("0").Raw)
	}
	if got := res.Get("0.headers.Location").String(); got != "/users/3" {
		t.Errorf("result headers: Location %q", got)
	}
	if res.Get("2.body").Exists() {
		t.Errorf("empty body must be omitted: %s", res.Get("2").Raw)
	}
	if u, _ := be.API.Get(1); u.Email != "new@mail.com" {
		t.Errorf("PUT did not reach the backend: %+v", u)
	}
	if _, ok := be.API.Get(2); ok {
		t.Error("DELETE did not reach the backend")
	}
}

func TestEnvelopeAliasesAndCounts(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))

	status, _, body := post(t, base+"/batch", `{"requests":[
		{"name":"mk","method":"post","url":"/users","body":{"name":"Bob"}},
		{"id":"list","relative_url":"/users"},
		{"id":"missing","path":"/users/999"}]}`, "Content-Type: application/vnd.api+json")
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body)
	if res.Get("results.0.id").String() != "mk" || res.Get("results.0.status").Int() != 201 {
		t.Errorf("name/url/lower-case method aliases: %s", res.Get("results.0").Raw)
	}
	if res.Get("results.1.body.data.0.name").String() != "Bob" {
		t.Errorf("relative_url alias, sequential order: %s", res.Get("results.1").Raw)
	}
	for field, want := range map[string]any{"status": "completed_with_errors", "total": int64(3), "succeeded": int64(2), "failed": int64(1), "skipped": int64(0)} {
		if got := res.Get(field).Value(); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s = %v, want %v", field, got, want)
		}
	}
	if !strings.HasPrefix(body, `{"results":[`) {
		t.Errorf("results must come first in the envelope: %.40s", body)
	}
}

func TestBulkItems(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))

	status, _, body := post(t, base+"/batch", `{"operation":{"method":"POST","path":"/users","headers":{"X-Source":"crm"}},
		"items":[{"name":"A"},{"name":"B"},{"name":"C"}], "mode":"parallel"}`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body)
	if res.Get("succeeded").Int() != 3 || res.Get("status").String() != "completed" {
		t.Fatalf("bulk import: %s", body)
	}
	for i, name := range []string{"A", "B", "C"} {
		if got := res.Get(fmt.Sprintf("results.%d.body.name", i)).String(); got != name {
			t.Errorf("item %d: got %q, want %q", i, got, name)
		}
	}
	for _, r := range be.requests() {
		if r.Header.Get("X-Source") != "crm" || r.Header.Get("Content-Type") != "application/json" {
			t.Errorf("template headers not applied: %v", r.Header)
		}
	}
	if be.API.Len() != 3 {
		t.Errorf("backend holds %d users, want 3", be.API.Len())
	}
}

// Validation happens before anything runs: every fault is listed, and the
// backend sees nothing.
func TestValidationLeavesBackendUntouched(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		max_ops 3
		max_body_size 2KB
		methods GET POST
		paths /users /users/*
	}`))

	cases := []struct {
		name, body string
		status     int
		want       []string // substrings of the faults, in order
	}{
		{"not json", `[{"path":"/users"`, 400, []string{"not valid JSON"}},
		{"empty", `[]`, 400, []string{"no operations"}},
		{"scalar", `"hi"`, 400, []string{"array of operations or an object"}},
		{"absolute", `[{"path":"http://x/"}]`, 400, []string{`origin-form, got "http://x/"`}},
		{"authority", `[{"path":"//x/users"}]`, 400, []string{"origin-form"}},
		{"backslash", `[{"path":"/users\\..\\admin"}]`, 400, []string{`'\'`}},
		{"crlf", `[{"path":"/users\r\nHost: evil"}]`, 400, []string{"control characters"}},
		{"nul", `[{"path":"/users\u0000"}]`, 400, []string{"control characters"}},
		{"dotdot", `[{"path":"/users/../admin"}]`, 400, []string{"dot-segments"}},
		{"encoded dotdot", `[{"path":"/users/%2e%2E/admin"}]`, 400, []string{"dot-segments"}},
		{"double-encoded dotdot", `[{"path":"/users/%252e%252e/admin"}]`, 400, []string{"dot-segments"}},
		{"outside paths", `[{"path":"/admin"}]`, 400, []string{`"/admin" is not allowed`}},
		{"method not allowed", `[{"method":"DELETE","path":"/users/1"}]`, 400, []string{"DELETE is not allowed"}},
		{"method not token", `[{"method":"GE T","path":"/users"}]`, 400, []string{"not a valid HTTP method"}},
		{"host header", `[{"path":"/users","headers":{"Host":"evil"}}]`, 400, []string{"Host may not be set"}},
		{"te header", `[{"path":"/users","headers":{"transfer-encoding":"chunked"}}]`, 400, []string{"Transfer-Encoding may not be set"}},
		{"proxy header", `[{"path":"/users","headers":{"Proxy-Authorization":"x"}}]`, 400, []string{"Proxy-Authorization may not be set"}},
		{"bad header name", `[{"path":"/users","headers":{"X Bad":"x"}}]`, 400, []string{"not a valid token"}},
		{"header crlf", `[{"path":"/users","headers":{"X-A":"a\r\nX-B: b"}}]`, 400, []string{"control characters"}},
		{"dup id", `[{"id":"a","path":"/users"},{"id":"a","path":"/users"}]`, 400, []string{`id "a" is already used`}},
		{"unknown dep", `[{"path":"/users","depends_on":["nope"]}]`, 400, []string{`unknown operation "nope"`}},
		{"cycle", `{"mode":"parallel","batch":[{"id":"a","path":"/users","depends_on":["b"]},{"id":"b","path":"/users","depends_on":["a"]}]}`, 400, []string{"dependency cycle: a -> b -> a"}},
		{"unknown field", `[{"path":"/users","heders":{}}]`, 400, []string{`unknown field "heders"`}},
		{"bad mode", `{"mode":"fast","batch":[{"path":"/users"}]}`, 400, []string{"mode must be"}},
		{"bad base64", `[{"method":"POST","path":"/users","body":"!!","body_encoding":"base64"}]`, 400, []string{"not valid base64"}},
		{"all faults", `[{"path":"http://x/"},{"method":"PATCH","path":"/users"},{"path":"/users/../x"}]`, 400,
			[]string{"origin-form", "PATCH is not allowed", "dot-segments"}},
		{"too many", `[{"path":"/users"},{"path":"/users"},{"path":"/users"},{"path":"/users"}]`, 413, nil},
		{"too big", `[{"path":"/users","body":"` + strings.Repeat("x", 3000) + `"}]`, 413, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, hdr, body := post(t, base+"/batch", tc.body)
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, body)
			}
			if hdr.Get("Content-Type") != "application/json" {
				t.Errorf("Content-Type %q", hdr.Get("Content-Type"))
			}
			res := mustJSON(t, body)
			if res.Get("error").String() == "" {
				t.Errorf("no error message: %s", body)
			}
			faults := res.Get("errors").Array()
			if tc.want != nil && len(faults) != len(tc.want) {
				t.Fatalf("want %d faults, got %s", len(tc.want), body)
			}
			for i, want := range tc.want {
				if msg := faults[i].Get("message").String(); !strings.Contains(msg, want) {
					t.Errorf("fault %d = %q, want it to say %q", i, msg, want)
				}
			}
		})
	}
	if n := len(be.requests()); n != 0 {
		t.Errorf("backend saw %d requests from invalid batches: %+v", n, be.requests())
	}

	// The fault names the operation's index and id.
	_, _, body := post(t, base+"/batch", `[{"path":"/users"},{"id":"x","path":"/a/../b"}]`)
	f := mustJSON(t, body).Get("errors.0")
	if f.Get("index").Int() != 1 || f.Get("id").String() != "x" {
		t.Errorf("fault must name index and id: %s", f.Raw)
	}
}

func TestWholeBatchAnswers(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))

	req, _ := http.NewRequest(http.MethodGet, base+"/batch", nil)
	status, hdr, body := do(t, req)
	if status != 405 || hdr.Get("Allow") != "POST" {
		t.Errorf("GET: status %d Allow %q: %s", status, hdr.Get("Allow"), body)
	}
	// What a browser sends cross-site without a preflight is refused, so
	// that no page can make a visitor's browser run operations.
	for _, ct := range []string{"text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
		"multipart/form-data; boundary=x", "TEXT/PLAIN", "application/json-seq", "application/jsonx"} {
		status, _, body = post(t, base+"/batch", `[{"path":"/users"}]`, "Content-Type: "+ct)
		if status != 415 || !strings.Contains(body, "application/json") {
			t.Errorf("%s: status %d: %s", ct, status, body)
		}
	}
	req, _ = http.NewRequest(http.MethodPost, base+"/batch", strings.NewReader(`[{"path":"/users"}]`))
	if status, _, body = do(t, req); status != 415 {
		t.Errorf("no Content-Type: status %d: %s", status, body)
	}
	for _, ct := range []string{"application/json", "application/json; charset=utf-8", "application/vnd.api+json", "Application/JSON"} {
		if status, _, body = post(t, base+"/batch", `[{"path":"/users"}]`, "Content-Type: "+ct); status != 200 {
			t.Errorf("%s: status %d: %s", ct, status, body)
		}
	}
	if n := len(be.requests()); n != 4 {
		t.Errorf("the backend saw %d requests, want the 4 of the JSON batches", n)
	}
	// The batch handler's matcher leaves other paths to the chain.
	if status, _, body = post(t, base+"/batchfoo", `[]`); status == 200 && strings.Contains(body, "results") {
		t.Errorf("/batchfoo was taken as a batch: %s", body)
	}
}

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
	status, _, body := post(t, base+"/batch", "["+strings.Join(ops, ",")+`,{"path":"/c"}]`)
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
	status, _, body := post(t, base+"/batch", fmt.Sprintf(`[
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
	status, _, body = post(t, base+"/batch", `[{"path":"/users"}]`, "Authorization: "+good)
	if status != 200 || mustJSON(t, body).Get("0.status").Int() != 200 {
		t.Errorf("inherited Authorization: %d %s", status, body)
	}
	for _, r := range be.requests() {
		if r.Path == "/users" && r.Header.Get("Authorization") != good {
			t.Errorf("backend saw an unauthenticated operation: %+v", r)
		}
	}
}

// 50 parallel POSTs come back complete and in order.
func TestParallelFiftyInOrder(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		mode parallel
		concurrency 8
	}`))

	var ops []string
	for i := range 50 {
		ops = append(ops, fmt.Sprintf(`{"id":"op%d","method":"POST","path":"/users","body":{"name":"user %d"}}`, i, i))
	}
	status, _, body := post(t, base+"/batch", "["+strings.Join(ops, ",")+"]")
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body).Array()
	if len(res) != 50 {
		t.Fatalf("%d results, want 50", len(res))
	}
	ids := map[int64]bool{}
	for i, r := range res {
		if r.Get("id").String() != fmt.Sprintf("op%d", i) || r.Get("status").Int() != 201 ||
			r.Get("body.name").String() != fmt.Sprintf("user %d", i) {
			t.Errorf("result %d out of place: %s", i, r.Raw)
		}
		ids[r.Get("body.id").Int()] = true
	}
	if len(ids) != 50 || be.API.Len() != 50 {
		t.Errorf("backend created %d users with %d distinct ids, want 50", be.API.Len(), len(ids))
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

	status, _, body := post(t, base+"/batch", `[
		{"id":"json","method":"POST","path":"/echo?a=1&b=%20","headers":{"X-Trace":["t1","t2"],"Accept":"application/x-own"},"body":{"k": [1, 2.50, "é"]}},
		{"id":"text","method":"PUT","path":"/echo","body":"plain text"},
		{"id":"bin","method":"POST","path":"/echo","body":"AP8=","body_encoding":"base64"},
		{"id":"typed","method":"POST","path":"/echo","headers":{"Content-Type":"application/xml"},"body":"<a/>"},
		{"id":"fwd","path":"/echo","headers":{"X-Forwarded-For":"6.6.6.6","X-Real-IP":"6.6.6.6","Forwarded":"for=6.6.6.6","X-Forwarded-Proto":"https"}},
		{"id":"inherit","path":"/inherit"}]`,
		"Accept: text/html", "Accept-Encoding: gzip", "Idempotency-Key: k1", "X-Tenant: acme", "Prefer: respond-async", "Authorization: Bearer t0k")
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

func TestResultBodies(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	_, _, body := post(t, base+"/batch", `[{"path":"/text"},{"path":"/binary"},{"path":"/badjson"},{"path":"/health"}]`)
	res := mustJSON(t, body).Array()
	if got := res[0].Get("body"); got.Type != gjson.String || got.String() != "hello \"batch\"\n" {
		t.Errorf("text body: %s", res[0].Raw)
	}
	if res[1].Get("body").String() != b64([]byte{0xff, 0, 0xfe, 1}) || res[1].Get("body_encoding").String() != "base64" {
		t.Errorf("binary body: %s", res[1].Raw)
	}
	if got := res[2].Get("body"); got.Type != gjson.String || got.String() != `{"broken":` {
		t.Errorf("invalid JSON must come back as text: %s", res[2].Raw)
	}
	if res[3].Get("body.status").String() != "ok" {
		t.Errorf("JSON body: %s", res[3].Raw)
	}
	if res[0].Get("error").Exists() {
		t.Errorf("error is only for batch-layer statuses: %s", res[0].Raw)
	}
}

func TestTimeoutsAndLimits(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		op_timeout 200ms
		max_response_size 1KB
	}`))
	status, _, body := post(t, base+"/batch", `[
		{"path":"/slow?d=5s"},
		{"path":"/big?n=800"},
		{"path":"/big?n=5000"},
		{"path":"/slow?d=1ms"}]`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body)
	for i, want := range []int64{504, 200, 502, 200} {
		if got := res.Get(fmt.Sprintf("%d.status", i)).Int(); got != want {
			t.Errorf("op %d: status %d, want %d: %s", i, got, want, res.Get(fmt.Sprint(i)).Raw)
		}
	}
	if !strings.Contains(res.Get("0.error").String(), "timed out") || !strings.Contains(res.Get("2.error").String(), "max_response_size") {
		t.Errorf("batch-layer errors must say why: %s", body)
	}
	if len(res.Get("1.body").String()) != 800 {
		t.Error("a response within the limit is kept whole")
	}

	// The whole batch is bounded by timeout: what did not finish is 504.
	base = startCaddy(t, proxySite(be, `{
		timeout 300ms
	}`))
	_, _, body = post(t, base+"/batch", `[{"path":"/slow?d=1ms"},{"path":"/slow?d=5s"},{"path":"/slow?d=1ms"}]`)
	res = mustJSON(t, body)
	if res.Get("0.status").Int() != 200 || res.Get("1.status").Int() != 504 || res.Get("2.status").Int() != 504 {
		t.Errorf("batch timeout: %s", body)
	}
	if !strings.Contains(res.Get("2.error").String(), "batch timed out") {
		t.Errorf("unrun op after batch timeout: %s", res.Get("2").Raw)
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

	status, _, body := post(t, base+"/batch", `{"mode":"parallel","batch":[
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
	if status, _, _ := post(t, base+"/batch", `[{"path":"/ok"}]`); status != 200 {
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
	_, _, body := post(t, base+"/batch", `[{"path":"/hello.txt"},{"path":"/vars"}]`)
	res := mustJSON(t, body)
	if res.Get("0.body").String() != "from disk" || res.Get("1.body").String() != "hello world" {
		t.Errorf("sub-requests must pass through root and vars: %s", body)
	}
}

func TestJSONConfig(t *testing.T) {
	be := newBackend(t)
	port := freePort(t)
	cfg := fmt.Sprintf(`{
	"admin": {"disabled": true, "config": {"persist": false}},
	"apps": {"http": {"servers": {"s": {
		"listen": ["127.0.0.1:%d"],
		"routes": [
			{"match": [{"path": ["/batch"]}], "handle": [{"handler": "batch", "mode": "parallel", "concurrency": 4, "max_ops": 2, "op_timeout": "5s", "methods": ["GET"]}]},
			{"handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": %q}]}]}
		]
	}}}}
}`, port, be.addr())
	base := loadCaddy(t, []byte(cfg), port)
	status, _, body := post(t, base+"/batch", `[{"path":"/health"},{"path":"/users"}]`)
	if status != 200 || mustJSON(t, body).Get("1.body.data").Raw != "[]" {
		t.Errorf("JSON config: %d %s", status, body)
	}
	if status, _, _ := post(t, base+"/batch", `[{"path":"/health"},{"path":"/health"},{"path":"/health"}]`); status != 413 {
		t.Errorf("max_ops from JSON config: %d", status)
	}
	if status, _, _ := post(t, base+"/batch", `[{"method":"POST","path":"/users"}]`); status != 400 {
		t.Errorf("methods from JSON config: %d", status)
	}
}

// An answer that fits in the first chunk goes out whole with its length; a
// longer one streams, and is whole JSON all the same.
func TestAnswerFramingBySize(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, "{\n\t\tmax_ops 100\n\t}"))

	status, hdr, body := post(t, base+"/batch", `[{"path":"/big?n=100"},{"path":"/big?n=200"}]`)
	if status != 200 || hdr.Get("Content-Length") != strconv.Itoa(len(body)) {
		t.Errorf("small answer: status %d, Content-Length %q for %d bytes", status, hdr.Get("Content-Length"), len(body))
	}
	mustJSON(t, body)

	ops := make([]string, 50)
	for i := range ops {
		ops[i] = `{"path":"/big?n=2000"}`
	}
	status, hdr, body = post(t, base+"/batch", `{"batch":[`+strings.Join(ops, ",")+`]}`)
	if status != 200 || hdr.Get("Content-Length") != "" {
		t.Errorf("large answer: status %d, Content-Length %q: it must stream", status, hdr.Get("Content-Length"))
	}
	res := mustJSON(t, body)
	if n := len(res.Get("results").Array()); n != 50 || res.Get("succeeded").Int() != 50 {
		t.Errorf("large answer: %d results, succeeded %d", n, res.Get("succeeded").Int())
	}
	if got := res.Get("results.49.body").String(); len(got) != 2000 {
		t.Errorf("last result's body has %d bytes, want 2000", len(got))
	}
}

// Operations that wait for none run on concurrency workers, started in
// array order, and their results come back in order though they end out
// of it.
func TestParallelIndependent(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		mode parallel
		concurrency 3
	}`))
	sleeps := []int{60, 10, 30, 10, 40, 10, 20, 10, 30}
	var ops []string
	total := 0
	for i, ms := range sleeps {
		ops = append(ops, fmt.Sprintf(`{"id":"p%d","path":"/slow?id=p%d&d=%dms"}`, i, i, ms))
		total += ms
	}
	start := time.Now()
	status, _, body := post(t, base+"/batch", "["+strings.Join(ops, ",")+"]")
	elapsed := time.Since(start)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	for i, r := range mustJSON(t, body).Array() {
		if r.Get("id").String() != fmt.Sprintf("p%d", i) || r.Get("status").Int() != 200 {
			t.Errorf("result %d: %s", i, r.Raw)
		}
	}
	be.mu.Lock()
	maxIn := be.maxInFlight
	be.mu.Unlock()
	if maxIn != 3 {
		t.Errorf("%d operations in flight at most, want concurrency 3", maxIn)
	}
	var first []string
	for _, e := range be.eventLog() {
		if id, ok := strings.CutPrefix(e, "start "); ok && len(first) < 3 {
			first = append(first, id)
		}
	}
	slices.Sort(first)
	if !slices.Equal(first, []string{"p0", "p1", "p2"}) {
		t.Errorf("first three started: %v, want p0 p1 p2 (array order)", first)
	}
	if elapsed >= time.Duration(total)*time.Millisecond {
		t.Errorf("took %v, as long as one after another (%d ms)", elapsed, total)
	}
}
