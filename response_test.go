package batch

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/tidwall/gjson"
)

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
	status, _, body := send(t, "POST", base+"/batch", `[{"id":"blob","path":"/blob"},{"path":"/too-deep"},{"path":"/deep-enough"},
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
	_, _, body := send(t, "POST", base+"/batch", ops)
	check("sync", body, mustJSON(t, body).Get("0"))
	if v := mustJSON(t, body).Get("1.headers.X-Name").String(); v != "caf\ufffd" {
		t.Errorf("header value %q", v)
	}

	_, _, body = send(t, "POST", base+"/batch", ops, "Accept: application/x-ndjson")
	lines := strings.Split(strings.TrimSpace(body), "\n")
	for _, l := range lines {
		if !json.Valid([]byte(l)) || !utf8.ValidString(l) {
			t.Errorf("ndjson line is not valid UTF-8 JSON: %q", l)
		}
	}
	check("ndjson", body, gjson.Parse(lines[0]))

	status, hdr, body := send(t, "POST", base+"/batch", ops, alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("async submit: %d %s", status, body)
	}
	waitJob(t, base+hdr.Get("Location"), alice, "completed")
	_, _, body = send(t, "GET", base+hdr.Get("Location")+"/results", "", alice)
	check("async", body, mustJSON(t, body).Get("results.0"))
}

// An answer goes into the batch answer by what it is: text as a string,
// bytes that are not UTF-8 as base64, JSON as JSON unless it is not
// valid; "error" is only for statuses the batch layer gives.
func TestResultBodies(t *testing.T) {
	t.Parallel()
	b := ptParse(t, ptLimits(t, nil), `[{"path":"/text"},{"path":"/binary"},{"path":"/badjson"},{"path":"/health"}]`)
	// As the backend answers those paths, captured as attempt does.
	answers := []struct {
		ctype string
		body  string
	}{
		{"text/plain; charset=utf-8", "hello \"batch\"\n"},
		{"application/octet-stream", "\xff\x00\xfe\x01"},
		{"application/json", `{"broken":`},
		{"application/json", `{"status":"ok"}` + "\n"},
	}
	w := httptest.NewRecorder()
	out := native.sink(w, httptest.NewRequest(http.MethodPost, "/batch", nil), b)
	for i, a := range answers {
		header := http.Header{"Content-Type": {a.ctype}}
		out.put(i, b.ops[i], &result{status: 200, header: header, body: []byte(a.body), isJSON: jsonBody(header, []byte(a.body))})
	}
	out.close(summary{status: statusCompleted, total: len(answers), succeeded: len(answers)})
	res := mustJSON(t, w.Body.String()).Array()
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

// With Accept: application/x-ndjson each result is on the wire, one line
// with its index, the moment it is final: before the next operation ends.
func TestNDJSONStreaming(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	resp, err := client.Do(request(t, "POST", base+"/batch", `[{"id":"fast","path":"/echo"},{"id":"slow","path":"/slow?id=s&d=500ms"}]`,
		"Accept: application/x-ndjson"))
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

// A sequential batch streams its results: however many operations it has,
// it holds about one answer at a time, not max_ops of them.
func TestSequentialBatchMemoryBounded(t *testing.T) {
	const (
		maxOps  = 22        // a first ten and a last ten after op 0
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
		// What the batch holds, not a compressor's.
		resp, err := client.Do(request(t, "POST", base+"/batch", ops, "Accept-Encoding: identity"))
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
	// per operation, to 21x.
	if held > 5*maxResp {
		t.Errorf("between operations the live heap grew up to %.1f MB; bound %d MB", float64(held)/1e6, 5*maxResp/1_000_000)
	}
	// Streaming: what is held does not grow with the operations. Keeping
	// each answer would put the last ten 11 MB above the first ten.
	if heldLast-heldFirst > 2*maxResp {
		t.Errorf("held memory grows with the operations: +%.1f MB over the first ten, +%.1f MB over the last ten", float64(heldFirst)/1e6, float64(heldLast)/1e6)
	}
	// With an operation's answer captured whole: add its buffer (up to 2x,
	// as append grows it by doubling while the answer is small): 7x.
	if peak > 7*maxResp {
		t.Errorf("with an answer captured the live heap grew up to %.1f MB; bound %d MB", float64(peak)/1e6, 7*maxResp/1_000_000)
	}
}

// A dry run answers each operation as it would be sent, and sends none
// (serveAlone fails a test that sends anything on).
func TestDryRun(t *testing.T) {
	t.Parallel()
	handler := handlerAlone(t, nil)
	w := serveAlone(t, handler, request(t, "POST", "http://127.0.0.1/batch", `{"dry_run":true,"mode":"parallel","batch":[
		{"id":"mk","method":"POST","path":"/users","headers":{"X-Forwarded-For":"6.6.6.6","X-Trace":"t"},"body":{"name":"A"}},
		{"path":"/users/{{mk.body.id}}"}]}`, "Authorization: Bearer t", "Accept-Encoding: gzip"))
	status, body := w.Code, w.Body.String()
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
	// A dry run still validates.
	if w := serveAlone(t, handler, request(t, "POST", "http://127.0.0.1/batch", `{"dry_run":true,"batch":[{"path":"//x"}]}`)); w.Code != 400 {
		t.Errorf("invalid dry run: %d", w.Code)
	}
}

// A dry run repeats the inherited headers for every operation: its answer
// is written as it is made, not held whole.
func TestDryRunStreamed(t *testing.T) {
	h := handlerAlone(t, nil)
	ops := "[" + strings.TrimSuffix(strings.Repeat(`{"path":"/users"},`, 100), ",") + "]"
	send := func(ops string) int64 {
		w := &discardWriter{header: http.Header{}}
		serveAloneTo(t, h, w, request(t, "POST", "http://127.0.0.1/batch", `{"dry_run":true,"batch":`+ops+`}`,
			"Cookie: c="+strings.Repeat("x", 500_000)))
		if w.status != 200 {
			t.Fatalf("status %d", w.status)
		}
		return w.n
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

// discardWriter counts an answer and keeps none of it.
type discardWriter struct {
	header http.Header
	status int
	n      int64
}

func (w *discardWriter) Header() http.Header { return w.header }

func (w *discardWriter) WriteHeader(status int) {
	if w.status == 0 {
		w.status = status
	}
}

func (w *discardWriter) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	w.n += int64(len(p))
	return len(p), nil
}

func TestLeanAnswers(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	_, _, body := send(t, "POST", base+"/batch", `{"omit_response_on_success":true,"batch":[
		{"method":"POST","path":"/users","body":{"name":"A"}},{"path":"/users/99"}]}`)
	res := mustJSON(t, body)
	if r := res.Get("results.0"); r.Get("status").Int() != 201 || r.Get("headers").Exists() || r.Get("body").Exists() {
		t.Errorf("omit_response_on_success kept a success's answer: %s", r.Raw)
	}
	if r := res.Get("results.1"); r.Get("status").Int() != 404 || !r.Get("body.error").Exists() || !r.Get("headers").Exists() {
		t.Errorf("omit_response_on_success must keep failures whole: %s", r.Raw)
	}
	_, _, body = send(t, "POST", base+"/batch", `{"include_headers":false,"batch":[{"path":"/users/1"},{"path":"/health"}]}`)
	res = mustJSON(t, body)
	if strings.Contains(body, `"headers"`) || res.Get("results.0.body.name").String() != "A" {
		t.Errorf("include_headers false: %s", body)
	}
}

// An answer that fits in the first chunk goes out whole with its length; a
// longer one streams, and is whole JSON all the same.
func TestAnswerFramingBySize(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, "{\n\t\tmax_ops 100\n\t}"))

	status, hdr, body := send(t, "POST", base+"/batch", `[{"path":"/big?n=100"},{"path":"/big?n=200"}]`, "Accept-Encoding: identity")
	if status != 200 || hdr.Get("Content-Length") != strconv.Itoa(len(body)) {
		t.Errorf("small answer: status %d, Content-Length %q for %d bytes", status, hdr.Get("Content-Length"), len(body))
	}
	mustJSON(t, body)

	ops := make([]string, 50)
	for i := range ops {
		ops[i] = `{"path":"/big?n=2000"}`
	}
	status, hdr, body = send(t, "POST", base+"/batch", `{"batch":[`+strings.Join(ops, ",")+`]}`, "Accept-Encoding: identity")
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

// FuzzEmbedAnswer feeds answers of any bytes and Content-Type to the result
// encoder: the batch answer is always valid UTF-8 JSON (one line with
// NDJSON), a JSON answer that can be embedded is embedded as it is, and
// nothing, however deep, crashes it.
func FuzzEmbedAnswer(f *testing.F) {
	deep := func(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }
	for _, s := range []string{`{"id":7}`, "{\"a\":\"\xff\"}", "caf\xe9", "\x00\x01", `"x"`, "{\"a\":\n1}\n", ` [1, 2] `,
		deep(maxAnswerDepth), deep(maxAnswerDepth + 1), strings.Repeat("[", 1<<20), strings.Repeat(`{"a":`, 200_000), `{"a":"\u0000"}`} {
		for _, ct := range []string{"application/json", "application/problem+json", "text/plain", ""} {
			f.Add([]byte(s), ct)
		}
	}
	f.Fuzz(func(t *testing.T, body []byte, ctype string) {
		t.Parallel() // the seeds' deep answers take a while each
		header := http.Header{}
		if ctype != "" {
			header.Set("Content-Type", ctype)
		}
		res := result{status: 200, header: header, body: body, isJSON: jsonBody(header, body)}
		for _, lean := range []leanOptions{{}, {oneLine: true}} {
			enc := appendResult(nil, -1, &operation{id: "op"}, &res, lean)
			if !utf8.Valid(enc) || !json.Valid(enc) {
				t.Fatalf("encoded result is not valid UTF-8 JSON: %q", enc)
			}
			if lean.oneLine && bytes.ContainsAny(enc, "\r\n") {
				t.Fatalf("NDJSON result spans lines: %q", enc)
			}
			got := gjson.GetBytes(enc, "body")
			switch {
			case len(body) == 0:
				if got.Exists() {
					t.Fatalf("empty answer gave a body: %q", enc)
				}
			case res.isJSON:
				if !json.Valid(body) || (got.Type == gjson.String) != (gjson.ParseBytes(body).Type == gjson.String) {
					t.Fatalf("JSON answer %q embedded as %s", body, got.Raw)
				}
			case utf8.Valid(body):
				if got.Str != string(body) {
					t.Fatalf("text answer %q embedded as %s", body, got.Raw)
				}
			default:
				if dec, err := base64.StdEncoding.DecodeString(got.Str); err != nil || !bytes.Equal(dec, body) ||
					gjson.GetBytes(enc, "body_encoding").Str != "base64" {
					t.Fatalf("binary answer %q embedded as %s", body, enc)
				}
			}
		}
	})
}
