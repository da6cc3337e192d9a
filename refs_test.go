package batch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"testing"

	"github.com/tidwall/gjson"
	"golang.org/x/net/http/httpguts"
)

func TestReferences(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		paths /users /users/* /echo /echo/*
	}`))

	status, _, body := send(t, "POST", base+"/batch", `[
		{"id":"create","method":"POST","path":"/users","body":{"name":"Alice","balance":7}},
		{"id":"read","path":"/users/{{create.body.id}}"},
		{"id":"follow","path":"{{create.headers.Location}}?from={{create.body.name}}"},
		{"id":"typed","method":"POST","path":"/echo","headers":{"X-Created":"{{create.status}}","X-Loc":"at {{create.headers.Location}}"},
		 "body":{"user":{"id":"{{create.body.id}}","whole":"{{create.body}}","flag":"{{read.body.balance}}","tags":["{{create.body.name}}","n={{create.body.id}}",{"deep":["{{create.status}}"]}]},"keep":"{{not a reference}}","{{create.body.id}}":1}},
		{"id":"text","method":"POST","path":"/echo","body":"hello {{create.body.name}}, you are {{create.body.id}}"},
		{"id":"plain","method":"POST","path":"/echo","body":{ "untouched" : "{{no ref}}" ,"n":1.50}}]`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body)
	if res.Get("1.status").Int() != 200 || res.Get("1.body.name").String() != "Alice" {
		t.Errorf("read by reference: %s", res.Get("1").Raw)
	}
	if res.Get("2.status").Int() != 200 || res.Get("2.body.id").Int() != 1 {
		t.Errorf("path made of a header reference: %s", res.Get("2").Raw)
	}
	if got := be.requests()[2].Path; got != "/users/1?from=Alice" {
		t.Errorf("follow sent %q", got)
	}

	echo := gjson.Parse(res.Get("3.body.body").String())
	if !echo.IsObject() {
		t.Fatalf("typed body is not JSON: %s", res.Get("3.body").Raw)
	}
	checks := map[string]string{
		"user.id":            "1", // a number stays a number
		"user.whole.name":    `"Alice"`,
		"user.whole":         `{"id":1,"name":"Alice","balance":7}`,
		"user.flag":          "7",
		"user.tags.0":        `"Alice"`,
		"user.tags.1":        `"n=1"`,
		"user.tags.2.deep.0": "201",
		"keep":               `"{{not a reference}}"`,
	}
	for path, want := range checks {
		if got := echo.Get(path).Raw; got != want {
			t.Errorf("typed body %s = %s, want %s", path, got, want)
		}
	}
	if echo.Get(`{{create\.body\.id}}`).Raw != "1" && !strings.Contains(echo.Raw, `"{{create.body.id}}":1`) {
		t.Errorf("keys must not be substituted: %s", echo.Raw)
	}
	hdr := res.Get("3.body.headers")
	if hdr.Get("X-Created.0").String() != "201" || hdr.Get("X-Loc.0").String() != "at /users/1" {
		t.Errorf("header references: %s", hdr.Raw)
	}
	if got := res.Get("4.body.body").String(); got != "hello Alice, you are 1" {
		t.Errorf("text body references: %q", got)
	}
	// An operation without references is sent byte for byte.
	if got := res.Get("5.body.body").String(); got != `{ "untouched" : "{{no ref}}" ,"n":1.50}` {
		t.Errorf("body without references changed: %q", got)
	}
}

func TestReferenceFailures(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		mode parallel
	}`))

	// A dot-segment in the literal part of a path is caught before anything runs.
	status, _, body := send(t, "POST", base+"/batch", `[{"id":"ok","method":"POST","path":"/users","body":{"name":"Zed"}},
		{"id":"dots","path":"/users/{{ok.body.name}}/../x"}]`)
	if status != 400 || !strings.Contains(body, "dot-segments") {
		t.Fatalf("a literal dot-segment must fail validation: %d %s", status, body)
	}

	want := []struct {
		status int64
		err    string
	}{
		{404, ""},
		{424, "dependency missing failed with status 404"},
		{424, "dependency needs failed with status 424"},
		{201, ""},
		{424, `no "nope" in the answer of operation ok`},
	}
	_, _, body = send(t, "POST", base+"/batch", `[
		{"id":"missing","path":"/users/999"},
		{"id":"needs","path":"/users/{{missing.body.id}}"},
		{"id":"chain","path":"/health","depends_on":["needs"]},
		{"id":"ok","method":"POST","path":"/users","body":{"name":"Zed"}},
		{"id":"nofield","path":"/users/{{ok.body.nope}}"},
		{"id":"escape","path":"/echo/{{esc.body.name}}"},
		{"id":"esc","method":"POST","path":"/users","body":{"name":"../../admin?x=1"}},
		{"id":"unrelated","path":"/health"},
		{"id":"safe","path":"/echo/{{mk.body.name}}?q={{mk.body.email}}"},
		{"id":"mk","method":"POST","path":"/users","body":{"name":"a/b?c d","email":"x&y=z"}}]`)
	res := mustJSON(t, body)
	for i, w := range want {
		r := res.Get(fmt.Sprint(i))
		if r.Get("status").Int() != w.status || !strings.Contains(r.Get("error").String(), w.err) {
			t.Errorf("op %d: %s, want %d %q", i, r.Raw, w.status, w.err)
		}
	}
	// A value is path-escaped: it cannot climb out of its segment, and one
	// that would after decoding is refused.
	if r := res.Get("5"); r.Get("status").Int() != 424 || !strings.Contains(r.Get("error").String(), "dot-segments") {
		t.Errorf("reference making a dot-segment: %s", r.Raw)
	}
	if got := res.Get("8.body.uri").String(); got != "/echo/a%2Fb%3Fc%20d?q=x%26y%3Dz" {
		t.Errorf("escaped path reference: %s", res.Get("8").Raw)
	}
	if res.Get("7.status").Int() != 200 {
		t.Errorf("unrelated operation must run: %s", res.Get("7").Raw)
	}
	for _, r := range be.requests() {
		if strings.Contains(r.Path, "admin") {
			t.Errorf("backend saw %s", r.Path)
		}
	}
	var healthCalls int
	for _, r := range be.requests() {
		if r.Path == "/health" {
			healthCalls++
		}
	}
	if healthCalls != 1 {
		t.Errorf("the failed chain must not reach the backend: /health called %d times", healthCalls)
	}
}

// FuzzReferences feeds batches with references, and answers for them to
// resolve against: parsing either refuses the batch with faults or accepts
// it, and every accepted operation either resolves to a valid target (and
// valid JSON, where its body was JSON) or is refused as unresolved (424).
func FuzzReferences(f *testing.F) {
	f.Add(`[{"id":"a","method":"POST","path":"/users"},{"path":"/users/{{a.body.id}}","headers":{"X":"{{a.headers.Location}}"},"body":{"v":"{{a.body}}","w":["x{{a.status}}"]}}]`, `{"id":7,"tags":["x"]}`)
	f.Add(`[{"id":"a","path":"/x"},{"path":"{{a.headers.Location}}?q={{a.body.0}}","body":"t {{a.body.q}}"}]`, `[1,"two",{"q":"a\"b"}]`)
	f.Add(`{"mode":"parallel","batch":[{"id":"a","path":"/x/{{b.body}}"},{"id":"b","path":"/y"}]}`, `"../.."`)
	f.Add(`[{"id":"a","path":"/x","rollback":{"method":"DELETE","path":"/x/{{a.body.id}}"}}]`, `{"id":"%2e%2e"}`)
	h := &Handler{}
	provision(f, h)
	f.Fuzz(func(t *testing.T, batchJSON, answer string) {
		b, err := parseBatch(context.Background(), []byte(batchJSON), &h.rules)
		if err != nil {
			var faults badBatchError
			var tooMany tooManyOpsError
			if !errors.As(err, &faults) && !errors.As(err, &tooMany) {
				t.Fatalf("rejected without faults: %v", err)
			}
			if errors.As(err, &faults) && len(faults) == 0 {
				t.Fatal("badBatchError with no fault")
			}
			return
		}
		rn := &runner{h: h, b: b, results: make([]result, len(b.ops))}
		rn.refs.reset(h.MaxReferenceSize)
		for i := range rn.results {
			hdr := http.Header{"Content-Type": {"application/json"}, "Location": {"/loc/" + answer}}
			rn.results[i] = result{status: 200, header: hdr, body: []byte(answer), isJSON: jsonBody(hdr, []byte(answer))}
		}
		check := func(op *operation) {
			if op == nil || op.refs == nil {
				return
			}
			got, err := rn.resolve(op)
			if err != nil {
				if !errors.As(err, new(unresolvedError)) {
					t.Fatalf("resolve failed with %T: %v", err, err)
				}
				return
			}
			if _, msg := parseTarget(got.target); msg != "" || got.url == nil {
				t.Fatalf("resolved target %q is invalid: %s", got.target, msg)
			}
			if op.refs.body != nil && !op.refs.textBody && !gjson.ValidBytes(got.body) {
				t.Fatalf("resolved JSON body is invalid: %s", got.body)
			}
			for name, vs := range got.header {
				for _, v := range vs {
					if !httpguts.ValidHeaderFieldValue(v) {
						t.Fatalf("resolved header %s has an invalid value %q", name, v)
					}
				}
			}
		}
		for _, op := range b.ops {
			check(op)
			check(op.rollback)
		}
	})
}

// What references add to one batch is bounded: by default by
// max_body_size, so that a small batch cannot make the backend (and Caddy)
// hold hundreds of megabytes. Past the bound an operation is not run.
func TestReferenceBytesBounded(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		max_body_size 250KB
	}`))
	// 100 kB of text, inserted twice (200 kB: within the default bound of
	// max_body_size), then once more (past it).
	status, _, body := send(t, "POST", base+"/batch", `[{"id":"a","path":"/big?n=100000"},
		{"id":"twice","method":"POST","path":"/echo","body":"{{a.body}}{{a.body}}"},
		{"id":"again","method":"POST","path":"/echo","body":"{{a.body}}"}]`)
	if status != 200 {
		t.Fatalf("status %d: %.300s", status, body)
	}
	res := mustJSON(t, body)
	if got := res.Get("1.body.length").Int(); res.Get("1.status").Int() != 200 || got != 200_000 {
		t.Errorf("twice: status %d, %d bytes sent", res.Get("1.status").Int(), got)
	}
	if r := res.Get("2"); r.Get("status").Int() != 424 || !strings.Contains(r.Get("error").String(), "max_reference_size (250000 bytes)") {
		t.Errorf("again: %.300s", r.Raw)
	}
	if n := len(be.requests()); n != 2 {
		t.Errorf("the backend saw %d requests, want 2", n)
	}

	// Configured, it holds across operations and in every place a
	// reference stands: here two 60 kB values fit a 150 kB bound, and
	// the third does not.
	base = startCaddy(t, proxySite(be, `{
		max_reference_size 150KB
	}`))
	_, _, body = send(t, "POST", base+"/batch", `[{"id":"a","path":"/big?n=60000"},
		{"method":"POST","path":"/echo","body":{"v":"{{a.body}}"}},
		{"method":"POST","path":"/echo","headers":{"X-V":"{{a.body}}"}},
		{"method":"POST","path":"/echo?q={{a.body}}"}]`)
	res = mustJSON(t, body)
	for i, want := range []int64{200, 200, 200, 424} {
		if got := res.Get(fmt.Sprintf("%d.status", i)).Int(); got != want {
			t.Errorf("op %d: status %d, want %d: %.200s", i, got, want, res.Get(fmt.Sprint(i)).Raw)
		}
	}
}

// GJSON modifiers in a reference path are refused: @fromstr and @pretty
// recurse over what they make, unbounded by the answer's checked depth.
// A literal @ in a key is written \@, and an @ inside a query's string is
// data.
func TestReferencePathsBounded(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, &Handler{})
	for _, path := range []string{`@pretty`, `s.@fromstr.@pretty`, `a|@reverse`, `items.#(@this>1)`,
		strings.Repeat("a.", maxRefComponents) + "z"} {
		body := `[{"id":"a","path":"/a"},{"path":"/b","body":{"v":"{{a.body.` + path + `}}"}}]`
		if faults := ptFaults(t, lim, body); !strings.Contains(faults[0].Message, "reference") {
			t.Errorf("%s: %s", path, ptDump(faults))
		}
	}
	for _, path := range []string{`\@odata\.nextLink`, `items.#(email=="a@example.com").id`, `data.0.id`} {
		v, _ := json.Marshal("{{a.body." + path + "}}")
		b := ptParse(t, lim, `[{"id":"a","path":"/a"},{"path":"/b","body":{"v":`+string(v)+`}}]`)
		if r := b.ops[1].refs.all(); len(r) != 1 || r[0].arg != path {
			t.Errorf("%s: refs %+v", path, r)
		}
	}
}

// The bytes references add are bounded before they are made: a 1 MB
// answer referenced a thousand times in one body allocates about the
// bound, not a gigabyte (a 2.9 KB batch once sent a 209 MB body).
func TestReferenceMemoryBounded(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, "")) // max_reference_size: max_body_size, 10 MiB
	batch := `[{"id":"a","path":"/big?n=1000000"},{"method":"POST","path":"/echo","body":"` +
		strings.Repeat("{{a.body}}", 1000) + `"}]`
	send(t, "POST", base+"/batch", `[{"path":"/big?n=1000000"}]`) // warm-up
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	status, _, body := send(t, "POST", base+"/batch", batch)
	runtime.ReadMemStats(&after)
	if r := mustJSON(t, body).Get("1"); status != 200 || r.Get("status").Int() != 424 {
		t.Fatalf("status %d: %.300s", status, r.Raw)
	}
	// The answer read (1 MB, copied a few times on its way), the
	// references up to the bound (10 MiB, grown by doubling: 20 MiB), the
	// batch's own answer: under 48 MiB allocated in all.
	if got := after.TotalAlloc - before.TotalAlloc; got > 48<<20 {
		t.Errorf("the batch allocated %d MB", got>>20)
	}
}
