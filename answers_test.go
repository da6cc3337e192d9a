package batch

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/tidwall/gjson"
)

func TestDryRun(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	status, _, body := post(t, base+"/batch", `{"dry_run":true,"mode":"parallel","batch":[
		{"id":"mk","method":"POST","path":"/users","headers":{"X-Forwarded-For":"6.6.6.6","X-Trace":"t"},"body":{"name":"A"}},
		{"path":"/users/{{mk.body.id}}"}]}`, "Authorization: Bearer t", "Accept-Encoding: gzip")
	if status != 200 {
		t.Fatalf("%d %s", status, body)
	}
	res := mustJSON(t, body)
	if res.Get("dry_run").Bool() != true || res.Get("total").Int() != 2 || res.Get("mode").String() != "parallel" {
		t.Errorf("dry run: %s", body)
	}
	op := res.Get("operations.0")
	h := op.Get("headers")
	if op.Get("method").String() != "POST" || op.Get("body_size").Int() != 12 ||
		h.Get("Authorization").String() != "Bearer t" || h.Get("X-Trace").String() != "t" ||
		h.Get("Content-Type").String() != "application/json" ||
		h.Get("X-Forwarded-For").Exists() || h.Get("Accept-Encoding").Exists() {
		t.Errorf("operation as it would be sent: %s", op.Raw)
	}
	if res.Get("operations.1.depends_on.0").String() != "mk" || res.Get("operations.1.path").String() != "/users/{{mk.body.id}}" {
		t.Errorf("dependent operation: %s", res.Get("operations.1").Raw)
	}
	if n := len(be.requests()); n != 0 {
		t.Errorf("a dry run sent %d requests", n)
	}
	// A dry run still validates.
	if status, _, _ := post(t, base+"/batch", `{"dry_run":true,"batch":[{"path":"//x"}]}`); status != 400 {
		t.Errorf("invalid dry run: %d", status)
	}
}

// A dry run repeats the inherited headers for every operation: its answer
// is written as it is made, not held whole.
func TestDryRunStreamed(t *testing.T) {
	be := newBackend(t)
	// Caddy takes 16 KB of headers by default; a server may take more.
	base := startCaddyGlobal(t, "servers {\n\t\tmax_header_size 1MB\n\t}", proxySite(be, ""))
	ops := "[" + strings.TrimSuffix(strings.Repeat(`{"path":"/users"},`, 100), ",") + "]"
	send := func(ops string) int64 {
		req, _ := http.NewRequest(http.MethodPost, base+"/batch", strings.NewReader(`{"dry_run":true,"batch":`+ops+`}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Cookie", "c="+strings.Repeat("x", 500_000))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		n, err := io.Copy(io.Discard, resp.Body)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("status %d: %v", resp.StatusCode, err)
		}
		return n
	}
	send(`[{"path":"/users"}]`) // warm-up
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	n := send(ops)
	runtime.ReadMemStats(&after)
	// The answer is 50 MB. Held whole (grown by append) it would cost
	// five times that; written in chunks, a fraction.
	if got := after.TotalAlloc - before.TotalAlloc; got > uint64(n)/2 {
		t.Errorf("a dry run of %d MB allocated %d MB", n>>20, got>>20)
	}
}

func TestLeanAnswers(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	_, _, body := post(t, base+"/batch", `{"omit_response_on_success":true,"batch":[
		{"method":"POST","path":"/users","body":{"name":"A"}},{"path":"/users/99"}]}`)
	res := mustJSON(t, body)
	if r := res.Get("results.0"); r.Get("status").Int() != 201 || r.Get("headers").Exists() || r.Get("body").Exists() {
		t.Errorf("omit_response_on_success kept a success's answer: %s", r.Raw)
	}
	if r := res.Get("results.1"); r.Get("status").Int() != 404 || !r.Get("body.error").Exists() || !r.Get("headers").Exists() {
		t.Errorf("omit_response_on_success must keep failures whole: %s", r.Raw)
	}
	_, _, body = post(t, base+"/batch", `{"include_headers":false,"batch":[{"path":"/users/1"},{"path":"/health"}]}`)
	res = mustJSON(t, body)
	if strings.Contains(body, `"headers"`) || res.Get("results.0.body.name").String() != "A" {
		t.Errorf("include_headers false: %s", body)
	}
}

func TestRetry429(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		retry_429 2
	}`))
	_, _, body := post(t, base+"/batch", `{"batch":[
		{"path":"/limited?id=a&n=2&after=0"},
		{"path":"/limited?id=b&n=5&after=0"},
		{"method":"POST","path":"/limited?id=c&n=1&after=7"},
		{"path":"/limited?id=d&n=9&after=3600"}]}`)
	res := mustJSON(t, body)
	checks := []struct {
		status, attempts int64
	}{{200, 3}, {429, 3}, {429, 0}, {429, 0}}
	for i, c := range checks {
		r := res.Get(fmt.Sprintf("results.%d", i))
		if r.Get("status").Int() != c.status || r.Get("attempts").Int() != c.attempts {
			t.Errorf("op %d: %s, want status %d attempts %d", i, r.Raw, c.status, c.attempts)
		}
	}
	if got := res.Get("results.2.headers.Retry-After").String(); got != "7" {
		t.Errorf("a 429 keeps its Retry-After: %q", got)
	}
	// d's Retry-After (1h) is beyond op_timeout: it is not waited for.
	if got := res.Get("retry_after").Int(); got != 3600 {
		t.Errorf("envelope retry_after = %d, want the largest, 3600: %s", got, body)
	}
	be.mu.Lock()
	n := be.limited["c"]
	be.mu.Unlock()
	if n != 1 {
		t.Errorf("POST is not idempotent: sent %d times", n)
	}
}

// A retry starts from the operation as written, not from the request a
// handler rewrote on the first try.
func TestRetry429AfterRewrite(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		retry_429 1
	}
	handle /api/* {
		uri strip_prefix /api
		reverse_proxy %s
	}
	handle {
		respond "not under /api" 404
	}`, be.addr()))
	_, _, body := post(t, base+"/batch", `[{"path":"/api/limited?id=r&n=1&after=0"}]`)
	r := mustJSON(t, body).Get("0")
	if r.Get("status").Int() != 200 || r.Get("attempts").Int() != 2 || r.Get("body.calls").Int() != 2 {
		t.Errorf("retried after a rewrite: %s", r.Raw)
	}
}

// With Accept: application/x-ndjson each result is on the wire, one line
// with its index, the moment it is final: before the next operation ends.
func TestNDJSONStreaming(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	req, _ := http.NewRequest(http.MethodPost, base+"/batch", strings.NewReader(
		`[{"id":"fast","path":"/echo"},{"id":"slow","path":"/slow?id=s&d=1s"}]`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/x-ndjson")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "application/x-ndjson" {
		t.Errorf("Content-Type %q", ct)
	}
	lines := bufio.NewReader(resp.Body)
	first, err := lines.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	if ev := be.eventLog(); slices.Contains(ev, "end s") {
		t.Errorf("the first result came only after the last operation ended: %v", ev)
	}
	r := mustJSON(t, first)
	if r.Get("index").Int() != 0 || r.Get("id").String() != "fast" || r.Get("status").Int() != 200 || !r.Get("body.headers").IsObject() {
		t.Errorf("first line: %s", first)
	}
	rest, _ := io.ReadAll(lines)
	out := strings.Split(strings.TrimSpace(string(rest)), "\n")
	if len(out) != 2 || mustJSON(t, out[0]).Get("index").Int() != 1 || mustJSON(t, out[1]).Get("summary").Bool() != true ||
		mustJSON(t, out[1]).Get("succeeded").Int() != 2 {
		t.Errorf("rest of the stream: %q", rest)
	}
}

// rawSite is a batch handler in front of a backend that answers each path
// with the status, headers and body of answers[path].
func rawSite(t *testing.T, batchBlock string, answers map[string]func(w http.ResponseWriter)) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if answer, ok := answers[r.URL.Path]; ok {
			answer(w)
			return
		}
		http.NotFound(w, r)
	}))
	t.Cleanup(srv.Close)
	return fmt.Sprintf("\n\tbatch /batch /batch/* %s\n\treverse_proxy %s", batchBlock, srv.Listener.Addr())
}

func jsonAnswer(body []byte) func(w http.ResponseWriter) {
	return func(w http.ResponseWriter) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	}
}

// An answer nested deeper than the JSON check may go goes into the batch as
// text. A client can have an API store any blob and read it back in the
// same batch; checked recursively, 9.5 MB of '[' overflow the stack, and a
// stack overflow kills the whole process.
func TestDeepAnswerEmbeddedAsText(t *testing.T) {
	nested := func(n int) []byte { return []byte(strings.Repeat("[", n) + strings.Repeat("]", n)) }
	blob := bytes.Repeat([]byte("["), 9_500_000)
	base := startCaddy(t, rawSite(t, "", map[string]func(http.ResponseWriter){
		"/blob":        jsonAnswer(blob),
		"/too-deep":    jsonAnswer(nested(maxAnswerDepth + 1)),
		"/deep-enough": jsonAnswer(nested(maxAnswerDepth)),
	}))
	status, _, body := post(t, base+"/batch", `[{"id":"blob","path":"/blob"},{"path":"/too-deep"},{"path":"/deep-enough"},
		{"path":"/x/{{blob.body.a}}"}]`)
	if status != 200 {
		t.Fatalf("status %d: %.300s", status, body)
	}
	res := mustJSON(t, body)
	if got := res.Get("0.body"); got.Type != gjson.String || got.Str != string(blob) {
		t.Errorf("the blob is not its text: %.100s", got.Raw)
	}
	if got := res.Get("1.body"); got.Type != gjson.String || got.Str != string(nested(maxAnswerDepth+1)) {
		t.Errorf("too deep: %.100s", got.Raw)
	}
	if got := res.Get("2.body"); !got.IsArray() {
		t.Errorf("%d levels are embedded as JSON: %.100s", maxAnswerDepth, got.Raw)
	}
	if r := res.Get("3"); r.Get("status").Int() != 424 || !strings.Contains(r.Get("error").String(), "did not answer JSON") {
		t.Errorf("a reference into the blob: %s", r.Raw)
	}
}

// An answer labelled JSON but not in UTF-8 is embedded as base64: the
// batch answer is valid UTF-8 JSON in every form, or strict clients read
// nothing of it.
func TestInvalidUTF8AnswerIsBase64(t *testing.T) {
	bad := []byte("{\"name\":\"caf\xe9\"}") // Latin-1, labelled JSON
	answers := map[string]func(http.ResponseWriter){
		"/latin1": jsonAnswer(bad),
		"/header": func(w http.ResponseWriter) {
			w.Header().Set("X-Name", "caf\xe9")
			jsonAnswer([]byte(`{"ok":true}`))(w)
		},
	}
	base := startCaddy(t, rawSite(t, `{
		async {
			retention 1h
		}
	}`, answers))
	const ops = `[{"path":"/latin1"},{"path":"/header"}]`
	check := func(form, answer string, result gjson.Result) {
		t.Helper()
		if !utf8.ValidString(answer) || !json.Valid([]byte(answer)) && form != "ndjson" {
			t.Errorf("%s: the answer is not valid UTF-8 JSON: %q", form, answer)
		}
		if result.Get("body_encoding").String() != "base64" || result.Get("body").String() != b64(bad) {
			t.Errorf("%s: %s", form, result.Raw)
		}
	}
	_, _, body := post(t, base+"/batch", ops)
	check("sync", body, mustJSON(t, body).Get("0"))
	if v := mustJSON(t, body).Get("1.headers.X-Name").String(); v != "caf\ufffd" {
		t.Errorf("header value %q", v)
	}

	_, _, body = post(t, base+"/batch", ops, "Accept: application/x-ndjson")
	lines := strings.Split(strings.TrimSpace(body), "\n")
	for _, l := range lines {
		if !json.Valid([]byte(l)) || !utf8.ValidString(l) {
			t.Errorf("ndjson line is not valid UTF-8 JSON: %q", l)
		}
	}
	check("ndjson", body, gjson.Parse(lines[0]))

	status, hdr, body := post(t, base+"/batch", ops, alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("async submit: %d %s", status, body)
	}
	waitJob(t, base+hdr.Get("Location"), alice, "completed")
	_, _, body = get(t, base+hdr.Get("Location")+"/results", alice)
	check("async", body, mustJSON(t, body).Get("results.0"))
}
