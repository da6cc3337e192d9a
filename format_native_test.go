package batch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/net/http/httpguts"
)

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

// Fuzz targets of the parser: every refused batch has faults, every
// accepted batch is checked whole (dependency graph acyclic, headers
// clean, rollbacks in shape), and every accepted target is decoded as a
// backend would decode it. FuzzParseTarget is in fields_test.go,
// FuzzReferences in refs_test.go, FuzzEmbedAnswer in response_test.go.
// Seeds are here and in testdata/fuzz/<name>/.

var fzBatchSeeds = []string{
	`[{"method":"POST","path":"/users","body":{"name":"Alice"}},{"method":"PUT","path":"/users/42","body":{"email":"new@mail.com"}},{"method":"DELETE","path":"/users/15"}]`,
	`{"requests":[{"name":"a","url":"/users?x=1"},{"id":"b","relative_url":"/users/{{a.body.0.id}}","dependsOn":"a"}],"mode":"parallel","include_headers":false}`,
	`{"operation":{"method":"post","path":"/users","headers":{"X-Source":"crm","X-Forwarded-For":"1.1.1.1"}},"items":[{"name":"A"},"text",1,null,[true]],"async":false}`,
	`{"atomicity":"all_or_nothing","batch":[{"id":"c","method":"POST","path":"/users","body":"{{x}}","rollback":{"method":"DELETE","path":"/users/{{c.body.id}}"}}]}`,
	`{"mode":"parallel","batch":[{"id":"a","path":"/a","depends_on":["c"]},{"id":"b","path":"/b","depends_on":["a"]},{"id":"c","path":"/c","depends_on":["b"]}]}`,
	`{"mode":"parallel","batch":[{"id":"a","path":"/a/{{b.status}}"},{"id":"b","path":"/b","headers":{"X-E":"{{a.headers.Etag}}"}}]}`,
	`[{"path":"/a","path":"/b"},{"id":"x","name":"y","url":"//evil/"},{"method":"GE T","path":"/%252e%252e/"},{"path":"/a","headers":{"Host":"h","X-Real-IP":"1"}}]`,
	`[{"path":"/a","body":"AAH/","body_encoding":"base64"},{"path":"/b","body":{},"body_encoding":"base64"},{"path":"/c","headers":{"Content-Type":"text/csv"},"body":"a,b"}]`,
	`{"batch":[{"path":"/a"}],"batch":[],"mode":"fast","atomicity":"some","async":1,"x":null}`,
	`[{"path":"/a","depends_on":["0"]},{"path":"/b","depends_on":["0","0",1]},{"id":"0","path":"/c"}]`,
	"[{\"path\":\"/a\xff\"}]",
	`[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]`,
	`[{"id":"l","path":"/users?email=a"},{"method":"POST","path":"/users","if":"status(l) == 404 || !(failed(l) && succeeded(l))"},{"path":"/users/{{l.body.id}}","if":"succeeded(l)","key":"k"}]`,
	`{"operation":{"method":"PATCH","path":"/u/{{item.id}}?q={{item.a.b}}","key":"{{item.k}}","headers":{"X-R":"{{item.id}}"},"body":{"n":"{{item.n}}","t":"x {{item.n}}"}},"items":[{"id":1,"n":2,"k":"a","a":{"b":"c d"}},{"id":"x/y"}]}`,
	`{"mode":"parallel","key_concurrency":2,"batch":[{"id":"a","path":"/a","key":"k","depends_on":["b"]},{"id":"b","path":"/b","key":"k"},{"id":"c","path":"/c","key":"j","depends_on":["a"]}]}`,
	`{"mode":"parallel","key_concurrency":1e4,"batch":[{"id":"a","path":"/a","key":"k"},{"id":"b","path":"/b","key":"k","depends_on":["c"]},{"id":"c","path":"/c","key":"j"}]}`,
	`[]`, `{}`, `null`, `"x"`, `[1]`, ``,
}

func FuzzParseBatch(f *testing.F) {
	for _, s := range fzBatchSeeds {
		f.Add(s)
	}
	for _, b := range adversarialBodies(64 << 10) { // hostile shapes, deep nesting included
		f.Add(string(b))
	}
	lim := ptLimits(f, &Handler{MaxOps: 50, AllowForwardedHeaders: []string{"X-Forwarded-Proto"}})
	limPar := ptLimits(f, &Handler{MaxOps: 50, Mode: "parallel"})
	f.Fuzz(func(t *testing.T, body string) {
		for _, l := range []*rules{lim, limPar} {
			b, err := parseBatch(context.Background(), []byte(body), l)
			b2, err2 := parseBatch(context.Background(), []byte(body), l)
			if (err == nil) != (err2 == nil) || err != nil && err.Error() != err2.Error() || (b == nil) != (b2 == nil) {
				t.Fatalf("two parses differ: %v / %v", err, err2)
			}
			if err != nil {
				fzCheckRefusal(t, b, err, l)
				continue
			}
			fzCheckBatch(t, b, l)
		}
	})
}

func fzCheckRefusal(t *testing.T, b *batch, err error, l *rules) {
	t.Helper()
	if b != nil {
		t.Fatalf("refused (%v), yet a batch came back", err)
	}
	var faults badBatchError
	var tooMany tooManyOpsError
	switch {
	case errors.As(err, &faults):
		if len(faults) == 0 || len(faults) > maxFaults+1 {
			t.Fatalf("%d faults", len(faults))
		}
		for _, f := range faults {
			if f.Message == "" || f.Index < -1 || f.Index >= l.maxOps {
				t.Fatalf("malformed fault %+v", f)
			}
		}
	case errors.As(err, &tooMany):
		if tooMany.n <= tooMany.max || tooMany.max != l.maxOps {
			t.Fatalf("too many: %+v", tooMany)
		}
	default:
		t.Fatalf("refused without faults: %T %v", err, err)
	}
}

func fzCheckBatch(t *testing.T, b *batch, l *rules) {
	t.Helper()
	if b == nil || len(b.ops) == 0 || len(b.ops) > l.maxOps {
		t.Fatalf("accepted with %d ops", len(b.ops))
	}
	if b.form < formArray || b.form > formBulk {
		t.Fatalf("form %d", b.form)
	}
	if b.mode != modeSequential && b.mode != modeParallel {
		t.Fatalf("mode %q", b.mode)
	}
	switch b.atomicity {
	case atomicNone:
	case atomicStopOnError, atomicAllOrNothing:
		if b.mode != modeSequential {
			t.Fatalf("atomicity %s in %s mode", b.atomicity, b.mode)
		}
	default:
		t.Fatalf("atomicity %q", b.atomicity)
	}
	ids := make(map[string]bool, len(b.ops))
	for i, op := range b.ops {
		if op == nil || op.index != i || op.isRollback {
			t.Fatalf("op %d: %+v", i, op)
		}
		if !validID(op.id) || ids[op.id] {
			t.Fatalf("op %d: id %q empty, invalid or repeated", i, op.id)
		}
		ids[op.id] = true
		fzCheckOp(t, op, l)
		seen := map[int]bool{}
		for _, d := range op.deps {
			if d < 0 || d >= len(b.ops) || d == i || seen[d] {
				t.Fatalf("op %d: dependency %d of %v", i, d, op.deps)
			}
			if b.mode == modeSequential && d > i {
				t.Fatalf("op %d: forward dependency %d in sequential mode", i, d)
			}
			seen[d] = true
		}
		if op.depIDs != nil {
			t.Fatalf("op %d: depIDs left over", i)
		}
		if op.refs != nil {
			for _, r := range op.refs.all() {
				if r.op < 0 || r.op >= len(b.ops) || r.op == i || !seen[r.op] {
					t.Fatalf("op %d: reference %s to %d, not among deps %v", i, r.raw, r.op, op.deps)
				}
			}
		}
		if c := op.cond; c != nil {
			for _, j := range c.ops {
				if j < 0 || j >= len(b.ops) || j == i || !seen[j] {
					t.Fatalf("op %d: if %s tests %d, not among deps %v", i, c, j, op.deps)
				}
			}
		}
		if len(op.key) > maxKeyLength {
			t.Fatalf("op %d: key of %d bytes", i, len(op.key))
		}
		if rb := op.rollback; rb != nil {
			if !rb.isRollback || rb.index != i || rb.id != op.id || rb.rollback != nil || len(rb.deps) != 0 {
				t.Fatalf("op %d: rollback %+v", i, rb)
			}
			fzCheckOp(t, rb, l)
		}
	}
	if b.keyConcurrency < 0 || b.keyConcurrency > maxKeyConcurrency {
		t.Fatalf("key_concurrency %d", b.keyConcurrency)
	}
	// No cycles, with an operation waiting for the one before it of its
	// key too: Kahn's algorithm removes every operation.
	waiting := make([]int, len(b.ops))
	after := make([][]int, len(b.ops))
	lastOfKey := map[string]int{}
	var ready []int
	for i, op := range b.ops {
		waiting[i] = len(op.deps)
		for _, d := range op.deps {
			after[d] = append(after[d], i)
		}
		if p, ok := lastOfKey[op.key]; ok && op.key != "" {
			waiting[i]++
			after[p] = append(after[p], i)
		}
		lastOfKey[op.key] = i
		if waiting[i] == 0 {
			ready = append(ready, i)
		}
	}
	done := 0
	for len(ready) > 0 {
		i := ready[len(ready)-1]
		ready = ready[:len(ready)-1]
		done++
		for _, j := range after[i] {
			if waiting[j]--; waiting[j] == 0 {
				ready = append(ready, j)
			}
		}
	}
	if done != len(b.ops) {
		t.Fatalf("dependency cycle accepted: %d of %d operations can run", done, len(b.ops))
	}
}

func fzCheckOp(t *testing.T, op *operation, l *rules) {
	t.Helper()
	if _, ok := l.methods[op.method]; !ok {
		t.Fatalf("op %d: method %q not allowed", op.index, op.method)
	}
	templated := op.refs != nil && op.refs.target != nil
	if !templated {
		if op.url == nil {
			t.Fatalf("op %d: target %q has no URL", op.index, op.target)
		}
		if u, msg := parseTarget(op.target); msg != "" || u.String() != op.url.String() {
			t.Fatalf("op %d: target %q: %s", op.index, op.target, msg)
		}
	} else if op.url != nil {
		t.Fatalf("op %d: templated target %q has a URL already", op.index, op.target)
	}
	for name, values := range op.header {
		if name != http.CanonicalHeaderKey(name) || !httpguts.ValidHeaderFieldName(name) {
			t.Fatalf("op %d: header name %q", op.index, name)
		}
		if refusedHeaders[name] || methodOverride[name] || strings.HasPrefix(name, "Proxy-") {
			t.Fatalf("op %d: header %s let through", op.index, name)
		}
		if _, allowed := l.forwarded[name]; isForwardedHeader(name) && !allowed {
			t.Fatalf("op %d: forwarded header %s let through", op.index, name)
		}
		for _, v := range values {
			if !httpguts.ValidHeaderFieldValue(v) {
				t.Fatalf("op %d: header %s value %q", op.index, name, v)
			}
		}
	}
	if op.body != nil && op.header.Get("Content-Type") == "" {
		t.Fatalf("op %d: body with no Content-Type", op.index)
	}
	if op.keepBody && !op.keepHeader {
		t.Fatalf("op %d: keeps its body but not its headers", op.index)
	}
}
