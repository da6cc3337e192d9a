package batch

import (
	"bytes"
	"fmt"
	"net/http"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

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

func TestParseForms(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, nil)
	cases := []struct {
		name, body      string
		form, ops       int
		mode, atomicity string
		async, dryRun   bool
		lean            leanOptions
	}{
		{"bare array", `[{"path":"/a"},{"path":"/b"}]`, formArray, 2, modeSequential, atomicNone, false, false, leanOptions{}},
		{"envelope batch", `{"batch":[{"path":"/a"}],"mode":"parallel"}`, formEnvelope, 1, modeParallel, atomicNone, false, false, leanOptions{}},
		{"envelope options", `{"batch":[{"path":"/a"}],"dry_run":true,"omit_response_on_success":true,"include_headers":false,"async":false}`,
			formEnvelope, 1, modeSequential, atomicNone, false, true, leanOptions{omitSuccess: true, noHeaders: true}},
		{"atomicity forces sequential", `{"batch":[{"path":"/a"}],"mode":"parallel","atomicity":"stop_on_error"}`, formEnvelope, 1, modeSequential, atomicStopOnError, false, false, leanOptions{}},
		{"all_or_nothing", `{"atomicity":"all_or_nothing","batch":[{"path":"/a"}]}`, formEnvelope, 1, modeSequential, atomicAllOrNothing, false, false, leanOptions{}},
		{"bulk", `{"operation":{"method":"POST","path":"/users"},"items":[{"name":"A"},{"name":"B"}],"mode":"parallel"}`, formBulk, 2, modeParallel, atomicNone, false, false, leanOptions{}},
		{"bulk keys in any order", `{"items":[1],"async":true,"operation":{"method":"POST","path":"/users"}}`, formBulk, 1, modeSequential, atomicNone, true, false, leanOptions{}},
		{"whitespace around", " \n\t[{\"path\":\"/a\"}]\r\n ", formArray, 1, modeSequential, atomicNone, false, false, leanOptions{}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := ptParse(t, lim, tc.body)
			if b.form != tc.form || len(b.ops) != tc.ops || b.mode != tc.mode || b.atomicity != tc.atomicity ||
				b.async != tc.async || b.dryRun != tc.dryRun || b.lean != tc.lean {
				t.Errorf("got form %d, %d ops, mode %q, atomicity %q, async %v, dry run %v, lean %+v",
					b.form, len(b.ops), b.mode, b.atomicity, b.async, b.dryRun, b.lean)
			}
			for i, op := range b.ops {
				if op.index != i {
					t.Errorf("op %d has index %d", i, op.index)
				}
			}
		})
	}

	// The configured defaults apply when a batch does not say.
	par := ptLimits(t, &Handler{Mode: "parallel", Atomicity: "none"})
	if b := ptParse(t, par, `[{"path":"/a"}]`); b.mode != modeParallel {
		t.Errorf("configured parallel: mode %q", b.mode)
	}
	if b := ptParse(t, par, `{"batch":[{"path":"/a"}],"mode":"sequential"}`); b.mode != modeSequential {
		t.Errorf("batch overrides configured mode: mode %q", b.mode)
	}
	stop := ptLimits(t, &Handler{Mode: "parallel", Atomicity: "stop_on_error"})
	if b := ptParse(t, stop, `[{"path":"/a"}]`); b.mode != modeSequential || b.atomicity != atomicStopOnError {
		t.Errorf("configured stop_on_error: mode %q, atomicity %q", b.mode, b.atomicity)
	}
	if b := ptParse(t, stop, `{"batch":[{"path":"/a"}],"atomicity":"none","mode":"parallel"}`); b.mode != modeParallel || b.atomicity != atomicNone {
		t.Errorf("batch overrides configured atomicity: mode %q, atomicity %q", b.mode, b.atomicity)
	}
}

func TestParseBulk(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, nil)
	body := `{"operation":{"method":"post","path":"/users?src=crm","headers":{"X-Source":"crm"}},
		"items":[{"name":"A"},"plain text",42,null,[1,2],{"name":"B"},true]}`
	b := ptParse(t, lim, body)
	want := []struct {
		body  string
		ctype string
	}{
		{`{"name":"A"}`, "application/json"},
		{"plain text", "text/plain; charset=utf-8"},
		{"42", "application/json"},
		{"", ""},
		{"[1,2]", "application/json"},
		{`{"name":"B"}`, "application/json"},
		{"true", "application/json"},
	}
	if len(b.ops) != len(want) {
		t.Fatalf("%d ops, want %d", len(b.ops), len(want))
	}
	for i, op := range b.ops {
		w := want[i]
		if op.id != fmt.Sprint(i) || op.index != i || op.method != "POST" || op.target != "/users?src=crm" || op.url == nil || op.url.Path != "/users" {
			t.Errorf("op %d: id %q index %d method %q target %q url %v", i, op.id, op.index, op.method, op.target, op.url)
		}
		if string(op.body) != w.body || (w.body == "") != (op.body == nil) {
			t.Errorf("op %d: body %q, want %q", i, op.body, w.body)
		}
		if got := op.header.Get("Content-Type"); got != w.ctype || len(op.header.Values("Content-Type")) > 1 {
			t.Errorf("op %d: Content-Type %q, want %q", i, op.header.Values("Content-Type"), w.ctype)
		}
		if got := op.header.Values("X-Source"); !reflect.DeepEqual(got, []string{"crm"}) {
			t.Errorf("op %d: X-Source %q", i, got)
		}
		if len(op.deps) != 0 || op.rollback != nil || op.refs != nil {
			t.Errorf("op %d: deps %v rollback %v tmpl %v", i, op.deps, op.rollback, op.refs)
		}
	}
	// The operation of the null item has the template's headers as they
	// were written: no item's default Content-Type leaked into them.
	tmplHeader := b.ops[3].header
	if !reflect.DeepEqual(tmplHeader, http.Header{"X-Source": {"crm"}}) {
		t.Errorf("template headers changed by the items: %v", tmplHeader)
	}
	// Items of different types have header maps of their own.
	if reflect.ValueOf(b.ops[0].header).UnsafePointer() == reflect.ValueOf(b.ops[1].header).UnsafePointer() {
		t.Error("a JSON item and a text item share one header map")
	}
	for _, i := range []int{0, 1, 2} {
		if reflect.ValueOf(b.ops[i].header).UnsafePointer() == reflect.ValueOf(tmplHeader).UnsafePointer() {
			t.Errorf("op %d shares the template's header map but needs its own Content-Type", i)
		}
	}

	t.Run("no template headers", func(t *testing.T) {
		b := ptParse(t, lim, `{"operation":{"method":"PUT","path":"/x"},"items":["t",{"a":1},null]}`)
		for i, want := range []string{"text/plain; charset=utf-8", "application/json", ""} {
			if got := b.ops[i].header.Get("Content-Type"); got != want {
				t.Errorf("op %d: Content-Type %q, want %q", i, got, want)
			}
		}
		if len(b.ops[2].header) != 0 {
			t.Errorf("null item has headers %v", b.ops[2].header)
		}
	})
	t.Run("template Content-Type wins", func(t *testing.T) {
		b := ptParse(t, lim, `{"operation":{"method":"POST","path":"/x","headers":{"Content-Type":"application/x-ndjson"}},"items":["t",{"a":1},7]}`)
		for i, op := range b.ops {
			if got := op.header.Values("Content-Type"); !reflect.DeepEqual(got, []string{"application/x-ndjson"}) {
				t.Errorf("op %d: Content-Type %q", i, got)
			}
		}
	})
	t.Run("base64 items", func(t *testing.T) {
		b := ptParse(t, lim, `{"operation":{"method":"POST","path":"/x","body_encoding":"base64"},"items":["AAE=","/w=="]}`)
		if !bytes.Equal(b.ops[0].body, []byte{0, 1}) || !bytes.Equal(b.ops[1].body, []byte{0xff}) {
			t.Errorf("bodies %q %q", b.ops[0].body, b.ops[1].body)
		}
		if got := b.ops[1].header.Get("Content-Type"); got != "application/octet-stream" {
			t.Errorf("Content-Type %q", got)
		}
	})
	t.Run("forwarded header in template", func(t *testing.T) {
		b := ptParse(t, lim, `{"operation":{"method":"POST","path":"/x","headers":{"X-Forwarded-For":"1.2.3.4","X-A":"a"}},"items":[1]}`)
		if _, ok := b.ops[0].header["X-Forwarded-For"]; ok || b.ops[0].header.Get("X-A") != "a" {
			t.Errorf("headers %v", b.ops[0].header)
		}
	})
}

func TestSpecExampleThroughReverseProxy(t *testing.T) {
	be := newBackend(t)
	be.seed("Old", "Gone") // ids 1 and 2
	base := startCaddy(t, proxySite(be, ""))

	status, hdr, body := send(t, "POST", base+"/batch", `[
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

	status, _, body := send(t, "POST", base+"/batch", `{"batch":[
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

	status, _, body := send(t, "POST", base+"/batch", `{"operation":{"method":"POST","path":"/users","headers":{"X-Source":"crm"}},
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

func TestWholeBatchAnswers(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))

	status, hdr, body := send(t, "GET", base+"/batch", "")
	if status != 405 || hdr.Get("Allow") != "POST" {
		t.Errorf("GET: status %d Allow %q: %s", status, hdr.Get("Allow"), body)
	}
	// What a browser sends cross-site without a preflight is refused, so
	// that no page can make a visitor's browser run operations.
	for _, ct := range []string{"text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
		"multipart/form-data; boundary=x", "TEXT/PLAIN", "application/json-seq", "application/jsonx"} {
		status, _, body = send(t, "POST", base+"/batch", `[{"path":"/users"}]`, "Content-Type: "+ct)
		if status != 415 || !strings.Contains(body, "application/json") {
			t.Errorf("%s: status %d: %s", ct, status, body)
		}
	}
	req, _ := http.NewRequest(http.MethodPost, base+"/batch", strings.NewReader(`[{"path":"/users"}]`))
	if status, _, body = do(t, req); status != 415 {
		t.Errorf("no Content-Type: status %d: %s", status, body)
	}
	for _, ct := range []string{"application/json", "application/json; charset=utf-8", "application/vnd.api+json", "Application/JSON"} {
		if status, _, body = send(t, "POST", base+"/batch", `[{"path":"/users"}]`, "Content-Type: "+ct); status != 200 {
			t.Errorf("%s: status %d: %s", ct, status, body)
		}
	}
	if n := len(be.requests()); n != 4 {
		t.Errorf("the backend saw %d requests, want the 4 of the JSON batches", n)
	}
	// The batch handler's matcher leaves other paths to the chain.
	if status, _, body = send(t, "POST", base+"/batchfoo", `[]`); status == 200 && strings.Contains(body, "results") {
		t.Errorf("/batchfoo was taken as a batch: %s", body)
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
