package batch

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/csv"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/tidwall/gjson"
	"golang.org/x/net/http/httpguts"
)

// Fuzz targets of the parser: every refused batch has faults, every
// accepted batch is checked whole (dependency graph acyclic, headers
// clean, rollbacks in shape), and every accepted target is decoded as a
// backend would decode it. FuzzReferences is in refs_test.go. Seeds are
// here and in testdata/fuzz/<name>/.

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
	`[]`, `{}`, `null`, `"x"`, `[1]`, ``,
}

var fzTargetSeeds = []string{
	"/", "/users/1?x=%20&y=/../", "/a/%2e%2e/b", "/a/%252e%252E/b", "/a/%25252e%25252e", "/a/..;x/b", "/a%2f..%2fb",
	"//x", "http://x/", "/a\\b", "/a%5c", "/a%00", "/a%0d%0a", "/a#f", "/a b", "/é", "/files/50%25off", "/a%", "/.well-known/x",
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
	// No cycles: Kahn's algorithm removes every operation.
	waiting := make([]int, len(b.ops))
	after := make([][]int, len(b.ops))
	var ready []int
	for i, op := range b.ops {
		waiting[i] = len(op.deps)
		for _, d := range op.deps {
			after[d] = append(after[d], i)
		}
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

func FuzzParseTarget(f *testing.F) {
	for _, s := range fzTargetSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, target string) {
		u, msg := parseTarget(target)
		if msg != "" {
			if u != nil {
				t.Fatalf("%q refused (%s), yet a URL came back", target, msg)
			}
			return
		}
		if u == nil {
			t.Fatalf("%q accepted with no URL", target)
		}
		// The fast path builds the URL itself: it must be what the
		// standard parser makes of the target.
		if want, err := url.ParseRequestURI(target); err != nil || !reflect.DeepEqual(u, want) {
			t.Fatalf("%q parsed as %#v, url.ParseRequestURI makes %#v (%v)", target, u, want, err)
		}
		if len(target) == 0 || target[0] != '/' || len(target) > 1 && target[1] == '/' {
			t.Fatalf("%q accepted: not a single leading '/'", target)
		}
		for i := 0; i < len(target); i++ {
			if c := target[i]; c <= ' ' || c == 0x7f || c == '\\' || c == '#' {
				t.Fatalf("%q accepted with byte %#x", target, c)
			}
		}
		if u.Scheme != "" || u.Host != "" || u.User != nil || u.Opaque != "" || u.Fragment != "" {
			t.Fatalf("%q accepted as %#v", target, u)
		}
		raw, _, _ := strings.Cut(target, "?")
		once, err := url.PathUnescape(raw)
		if err != nil {
			t.Fatalf("%q accepted with a bad escape: %v", target, err)
		}
		if u.Path != once {
			t.Fatalf("%q: URL path %q, decoded %q", target, u.Path, once)
		}
		// Decoded as the parser does, as far as a lenient backend would:
		// up to three times, while each decoding succeeds.
		p := raw
		for n := 0; ; n++ {
			for i := 0; i < len(p); i++ {
				if c := p[i]; c < ' ' || c == 0x7f || c == '\\' {
					t.Fatalf("%q decodes to %q, with byte %#x", target, p, c)
				}
			}
			for seg := range strings.SplitSeq(p, "/") {
				if seg, _, _ = strings.Cut(seg, ";"); seg == "." || seg == ".." {
					t.Fatalf("%q decodes to %q, with a dot-segment", target, p)
				}
			}
			d, err := url.PathUnescape(p)
			if n == 3 || err != nil || d == p {
				break
			}
			p = d
		}
	})
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

// FuzzCSVItems reads any bytes as a CSV body: nothing panics, every item is
// valid UTF-8 JSON within the bound, with exactly the header's names as
// keys, in order, and the cells that encoding/csv reads for its record as
// values; every record read is an item or a fault, and a body without
// faults has an item for each record.
func FuzzCSVItems(f *testing.F) {
	for _, s := range []string{
		"id,email\n7,a@b.c\n8,d@e.f\n", "id,email\r\n7,a@b.c\r\n8,d@e.f", "\xef\xbb\xbf\"id\",name\n1,A\n",
		"id,note\n1,\"a\nb\r\nc\"\n2,x\n\"3\n\",y\n", "\n\na,b\n\n1,2\r\n\r\n\n3,4\n\n", "a,b\n \n,\n\"\",\"\"\n",
		"k\xff,n\x00\n\xfe\x00,\xe2\x82\n", "a,b\n1\n2,3\n4,5,6\n", "a,b\n3,x\"y\n", "a,b\n\"x\"y,2\n", "a,b\n1,\"xyz\n2,3\n",
		"a,,c\n1,2,3\n", "id,name,id\n", "\xff,\xfe,a\xff,a\ufffd\n1,2,3,4\n", "a,b,c,d,e,f,g,h,i\n", "a\n,,,,,,,,,,\n",
		"a\n" + strings.Repeat("x", 300) + "\n", "a\n" + strings.Repeat("\x00", 40) + "\n1\n", "", "\n", "\"", "a\n\"",
	} {
		f.Add([]byte(s))
	}
	lim := csvLimits{maxRecord: 200, maxColumns: 8}
	f.Fuzz(func(t *testing.T, body []byte) {
		// What encoding/csv reads, with no bounds: the names, and each
		// record by the line it starts on.
		ref := csv.NewReader(bytes.NewReader(bytes.TrimPrefix(body, utf8BOM)))
		ref.FieldsPerRecord = -1
		var names []string
		want := map[int][]string{}
		for {
			rec, err := ref.Read()
			if err != nil {
				break
			}
			if names == nil {
				names = rec
				continue
			}
			line, _ := ref.FieldPos(0)
			want[line] = rec
		}
		var items, faults, last int
		records, err := readCSVItems(bytes.NewReader(body), lim,
			func(line int, obj []byte) bool {
				items++
				if line <= last {
					t.Fatalf("item at line %d after line %d", line, last)
				}
				last = line
				if !utf8.Valid(obj) || !json.Valid(obj) || int64(len(obj)) > lim.maxRecord {
					t.Fatalf("line %d: item %q is not valid UTF-8 JSON within the bound", line, obj)
				}
				rec, ok := want[line]
				if !ok || len(rec) != len(names) {
					t.Fatalf("line %d: item %s, where encoding/csv reads %q", line, obj, rec)
				}
				k, seen := 0, map[string]bool{}
				gjson.ParseBytes(obj).ForEach(func(key, v gjson.Result) bool {
					if seen[key.String()] {
						t.Fatalf("line %d: item %s repeats key %q", line, obj, key.String())
					}
					seen[key.String()] = true
					if k >= len(names) || key.String() != string([]rune(names[k])) || v.Type != gjson.String || v.Str != string([]rune(rec[k])) {
						t.Fatalf("line %d: item %s, where the header is %q and the record %q", line, obj, names, rec)
					}
					k++
					return true
				})
				if k != len(names) {
					t.Fatalf("line %d: item %s has %d keys, the header %d", line, obj, k, len(names))
				}
				return true
			},
			func(line int, msg string) bool {
				if line < 1 || msg == "" {
					t.Fatalf("fault %q at line %d", msg, line)
				}
				faults++
				return true
			})
		switch {
		case err != nil:
			t.Fatalf("error reading from memory: %v", err)
		case records == 0 && items > 0, records > 0 && items+faults != records:
			t.Fatalf("%d records read, %d items, %d faults", records, items, faults)
		case faults == 0 && items != len(want):
			t.Fatalf("no fault, yet %d items of %d records", items, len(want))
		}
	})
}
