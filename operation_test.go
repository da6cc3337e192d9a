package batch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"
)

// Unit tests of the parser: each rule of an operation pinned down on its
// own, with the exact index and id of each fault. The forms are in
// format_native_test.go, targets and headers in fields_test.go.

// ptLimits provisions and validates h (a zero Handler if nil) as Caddy
// would, and returns the limits parseBatch is given.
func ptLimits(t testing.TB, h *Handler) *rules {
	t.Helper()
	return &handlerAlone(t, h).rules
}

// ptParse parses a batch that must be accepted.
func ptParse(t *testing.T, lim *rules, body string) *batch {
	t.Helper()
	b, err := parseBatch(context.Background(), []byte(body), lim)
	if err != nil {
		t.Fatalf("%s\nrefused: %v", ptShort(body), err)
	}
	if b == nil || len(b.ops) == 0 {
		t.Fatalf("%s\naccepted with no operations", ptShort(body))
	}
	return b
}

// ptFaults parses a batch that must be refused with faults.
func ptFaults(t *testing.T, lim *rules, body string) badBatchError {
	t.Helper()
	b, err := parseBatch(context.Background(), []byte(body), lim)
	var faults badBatchError
	if !errors.As(err, &faults) {
		t.Fatalf("%s\ngot batch %v, error %T %v; want faults", ptShort(body), b != nil, err, err)
	}
	if b != nil {
		t.Fatalf("%s\nrefused, yet a batch came back", ptShort(body))
	}
	if len(faults) == 0 {
		t.Fatalf("%s\nbadBatchError with no faults", ptShort(body))
	}
	return faults
}

// ptRefused checks the answer to a batch refused whole: status, in JSON
// with an error; a 413's error says want[0], a 400 lists a fault per want
// (nil: any), in order, each saying it.
func ptRefused(t *testing.T, w *httptest.ResponseRecorder, status int, want []string) {
	t.Helper()
	body := w.Body.String()
	if w.Code != status {
		t.Fatalf("status %d, want %d: %.300s", w.Code, status, body)
	}
	if ct := w.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	res := mustJSON(t, body)
	if res.Get("error").String() == "" {
		t.Errorf("no error message: %.300s", body)
	}
	if status == http.StatusRequestEntityTooLarge {
		if len(want) > 0 && !strings.Contains(res.Get("error").String(), want[0]) {
			t.Errorf("error %q, want it to say %q", res.Get("error"), want[0])
		}
		return
	}
	faults := res.Get("errors").Array()
	if want != nil && len(faults) != len(want) {
		t.Fatalf("want %d faults, got %.300s", len(want), body)
	}
	for i, want := range want {
		if msg := faults[i].Get("message").String(); !strings.Contains(msg, want) {
			t.Errorf("fault %d = %q, want it to say %q", i, msg, want)
		}
	}
}

func ptShort(s string) string {
	if len(s) > 300 {
		return fmt.Sprintf("%q... (%d bytes)", s[:300], len(s))
	}
	return fmt.Sprintf("%q", s)
}

// ptFault is a fault expected: at index (-1: the whole batch), naming id
// (checked for operation faults only), with msg in its message.
type ptFault struct {
	index int
	id    string
	msg   string
}

// ptMatchFaults checks that each fault of want is in got, in order.
func ptMatchFaults(t *testing.T, body string, got badBatchError, want []ptFault) {
	t.Helper()
	j := 0
	for _, f := range got {
		if j < len(want) && f.Index == want[j].index && (f.Index < 0 || f.ID == want[j].id) && strings.Contains(f.Message, want[j].msg) {
			j++
		}
	}
	if j < len(want) {
		t.Errorf("%s\nfaults %s\nmissing %+v", ptShort(body), ptDump(got), want[j])
	}
}

func ptDump(faults badBatchError) string {
	var sb strings.Builder
	for _, f := range faults {
		fmt.Fprintf(&sb, "\n  {index %d, id %q: %s}", f.Index, f.ID, f.Message)
	}
	return sb.String()
}

// ptChain returns n operations, each depending on the one before (or on
// the one after, with forward) through depends_on.
func ptChain(n int, forward bool) string {
	var sb strings.Builder
	sb.WriteString(`{"mode":"parallel","batch":[`)
	for i := range n {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, `{"id":"op%d","path":"/items/%d"`, i, i)
		switch {
		case forward && i < n-1:
			fmt.Fprintf(&sb, `,"depends_on":["op%d"]`, i+1)
		case !forward && i > 0:
			fmt.Fprintf(&sb, `,"depends_on":"op%d"`, i-1)
		}
		sb.WriteByte('}')
	}
	sb.WriteString(`]}`)
	return sb.String()
}

func TestParseOperation(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, nil)
	type check func(t *testing.T, ops []*operation)
	one := func(f func(t *testing.T, op *operation)) check {
		return func(t *testing.T, ops []*operation) { f(t, ops[0]) }
	}
	body := func(want []byte, ctype string) check {
		return one(func(t *testing.T, op *operation) {
			if !bytes.Equal(op.body, want) || (want == nil) != (op.body == nil) {
				t.Errorf("body %q (nil %v), want %q (nil %v)", op.body, op.body == nil, want, want == nil)
			}
			if got := op.header.Values("Content-Type"); ctype == "" && len(got) > 0 || ctype != "" && !reflect.DeepEqual(got, []string{ctype}) {
				t.Errorf("Content-Type %q, want %q", got, ctype)
			}
		})
	}
	target := func(raw, path, query string) check {
		return one(func(t *testing.T, op *operation) {
			if op.target != raw || op.url == nil || op.url.Path != path || op.url.RawQuery != query {
				t.Errorf("target %q url %+v, want %q, path %q, query %q", op.target, op.url, raw, path, query)
			}
		})
	}
	ids := func(want ...string) check {
		return func(t *testing.T, ops []*operation) {
			var got []string
			for _, op := range ops {
				got = append(got, op.id)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("ids %q, want %q", got, want)
			}
		}
	}
	method := func(want string) check {
		return one(func(t *testing.T, op *operation) {
			if op.method != want {
				t.Errorf("method %q, want %q", op.method, want)
			}
		})
	}
	deps := func(want ...[]int) check {
		return func(t *testing.T, ops []*operation) {
			for i, op := range ops {
				var w []int
				if i < len(want) {
					w = want[i]
				}
				if len(op.deps) != len(w) || len(w) > 0 && !reflect.DeepEqual(op.deps, w) {
					t.Errorf("op %d: deps %v, want %v", i, op.deps, w)
				}
				if op.depIDs != nil {
					t.Errorf("op %d: depIDs %q left over", i, op.depIDs)
				}
			}
		}
	}
	header := func(want http.Header) check {
		return one(func(t *testing.T, op *operation) {
			if !reflect.DeepEqual(op.header, want) {
				t.Errorf("headers %v, want %v", op.header, want)
			}
		})
	}

	cases := []struct {
		name, body string
		check      check
	}{
		// Ids and their alias; the default is the index.
		{"id", `[{"id":"create-1","path":"/a"}]`, ids("create-1")},
		{"name alias", `[{"name":"a_B","path":"/a"}]`, ids("a_B")},
		{"default ids", `[{"path":"/a"},{"id":"x","path":"/b"},{"path":"/c"}]`, ids("0", "x", "2")},
		{"id of 128 characters", `[{"id":"` + strings.Repeat("a", 128) + `","path":"/a"}]`, ids(strings.Repeat("a", 128))},
		{"default ids in envelope", `{"batch":[{"path":"/a"},{"path":"/b"}]}`, ids("0", "1")},

		// Methods: default GET, upper-cased.
		{"default method", `[{"path":"/a"}]`, method("GET")},
		{"method lower case", `[{"method":"post","path":"/a"}]`, method("POST")},
		{"method mixed case", `[{"method":"pAtCh","path":"/a"}]`, method("PATCH")},
		{"method HEAD", `[{"method":"HEAD","path":"/a"}]`, method("HEAD")},

		// Targets and their aliases.
		{"path", `[{"path":"/users/42"}]`, target("/users/42", "/users/42", "")},
		{"url alias", `[{"url":"/users?limit=5"}]`, target("/users?limit=5", "/users", "limit=5")},
		{"relative_url alias", `[{"relative_url":"/me/feed?fields=id,name"}]`, target("/me/feed?fields=id,name", "/me/feed", "fields=id,name")},
		{"percent-encoded path", `[{"path":"/files/a%20b/caf%C3%A9?q=a%26b"}]`, target("/files/a%20b/caf%C3%A9?q=a%26b", "/files/a b/café", "q=a%26b")},
		{"dots in query", `[{"path":"/a?next=/../b"}]`, target("/a?next=/../b", "/a", "next=/../b")},

		// Dependencies and their alias.
		{"depends_on array", `[{"id":"a","path":"/a"},{"id":"b","path":"/b"},{"path":"/c","depends_on":["a","b"]}]`, deps(nil, nil, []int{0, 1})},
		{"depends_on string", `[{"id":"a","path":"/a"},{"path":"/b","depends_on":"a"}]`, deps(nil, []int{0})},
		{"dependsOn alias", `[{"id":"a","path":"/a"},{"path":"/b","dependsOn":["a"]}]`, deps(nil, []int{0})},
		{"depends_on null", `[{"path":"/a","depends_on":null}]`, deps(nil)},
		{"depends_on empty", `[{"path":"/a","depends_on":[]}]`, deps(nil)},
		{"depends_on repeated once", `[{"id":"a","path":"/a"},{"path":"/b","depends_on":["a","a"]}]`, deps(nil, []int{0})},
		{"depends on a default id", `[{"path":"/a"},{"path":"/b","depends_on":["0"]}]`, deps(nil, []int{0})},
		{"reference implies depends_on", `[{"id":"a","path":"/a"},{"path":"/b/{{a.body.id}}"}]`, deps(nil, []int{0})},
		{"parallel forward depends_on", `{"mode":"parallel","batch":[{"path":"/a","depends_on":["b"]},{"id":"b","path":"/b"}]}`, deps([]int{1})},

		// Bodies.
		{"object body exact bytes", `[{"path":"/a","body":{ "name" : "Alice", "n":[1, 2.50e1] }}]`, body([]byte(`{ "name" : "Alice", "n":[1, 2.50e1] }`), "application/json")},
		{"array body", `[{"path":"/a","body":[1,"two",null]}]`, body([]byte(`[1,"two",null]`), "application/json")},
		{"empty object body", `[{"path":"/a","body":{}}]`, body([]byte(`{}`), "application/json")},
		{"number body", `[{"path":"/a","body":-1.50E+3}]`, body([]byte(`-1.50E+3`), "application/json")},
		{"true body", `[{"path":"/a","body":true}]`, body([]byte(`true`), "application/json")},
		{"false body", `[{"path":"/a","body":false}]`, body([]byte(`false`), "application/json")},
		{"string body", `[{"path":"/a","body":"héllo\n\"w\"\u00e9\ud83d\ude00"}]`, body([]byte("héllo\n\"w\"é😀"), "text/plain; charset=utf-8")},
		{"empty string body", `[{"path":"/a","body":""}]`, body([]byte{}, "text/plain; charset=utf-8")},
		{"base64 body", `[{"path":"/a","body":"AAH/gA==","body_encoding":"base64"}]`, body([]byte{0, 1, 0xff, 0x80}, "application/octet-stream")},
		{"null body", `[{"method":"POST","path":"/a","body":null}]`, body(nil, "")},
		{"no body", `[{"method":"POST","path":"/a"}]`, body(nil, "")},
		{"explicit Content-Type wins over JSON", `[{"path":"/a","headers":{"Content-Type":"application/merge-patch+json"},"body":{"a":1}}]`, body([]byte(`{"a":1}`), "application/merge-patch+json")},
		{"explicit content-type wins over text", `[{"path":"/a","headers":{"content-type":"text/csv"},"body":"a,b\n1,2"}]`, body([]byte("a,b\n1,2"), "text/csv")},
		{"explicit Content-Type wins over base64", `[{"path":"/a","headers":{"Content-Type":"image/png"},"body":"iVBO","body_encoding":"base64"}]`, body([]byte{0x89, 0x50, 0x4e}, "image/png")},
		{"Content-Type kept with no body", `[{"path":"/a","headers":{"Content-Type":"text/plain"}}]`, body(nil, "text/plain")},

		// Headers: canonical names, strings or lists of strings.
		{"headers", `[{"path":"/a","headers":{"x-one":"1","X-Many":["a","b"],"Accept":""}}]`,
			header(http.Header{"X-One": {"1"}, "X-Many": {"a", "b"}, "Accept": {""}})},
		{"headers null", `[{"path":"/a","headers":null}]`, header(nil)},
		{"headers and JSON body", `[{"path":"/a","headers":{"X-A":"1"},"body":[]}]`,
			header(http.Header{"X-A": {"1"}, "Content-Type": {"application/json"}})},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := ptParse(t, lim, tc.body)
			tc.check(t, b.ops)
		})
	}
}

func TestParseFaults(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, nil)
	limPaths := ptLimits(t, &Handler{Paths: []string{"/users", "/users/*"}})
	op := func(fields string) string { return `[{"path":"/ok"},{"id":"x",` + fields + `}]` }
	whole := func(msg string) []ptFault { return []ptFault{{-1, "", msg}} }
	at := func(index int, id, msg string) []ptFault { return []ptFault{{index, id, msg}} }
	cases := []struct {
		name, body string
		want       []ptFault
		lim        *rules
	}{
		// Not a batch at all.
		{"empty body", ``, whole("not valid JSON"), nil},
		{"not JSON", `[{"path":"/a"}`, whole("not valid JSON"), nil},
		{"trailing data", `[{"path":"/a"}] []`, whole("not valid JSON"), nil},
		{"single quotes", `[{'path':'/a'}]`, whole("not valid JSON"), nil},
		{"string", `"batch"`, whole("must be a JSON array of operations or an object"), nil},
		{"number", `7`, whole("must be a JSON array of operations or an object"), nil},
		{"null", `null`, whole("must be a JSON array of operations or an object"), nil},
		{"invalid UTF-8 in a string", "[{\"path\":\"/a\xff\"}]", whole("not valid UTF-8"), nil},
		{"invalid UTF-8 in a key", "[{\"pa\xc3th\":\"/a\"}]", whole("not valid UTF-8"), nil},
		{"UTF-8 surrogate bytes", "[{\"path\":\"/a\",\"body\":\"\xed\xa0\x80\"}]", whole("not valid UTF-8"), nil},
		{"overlong UTF-8", "[{\"path\":\"/\xc0\xaf\"}]", whole("not valid UTF-8"), nil},
		{"nesting too deep", `[{"path":"/a","body":` + strings.Repeat("[", 63) + strings.Repeat("]", 63) + `}]`, whole("deeper than 64 levels"), nil},
		{"nesting far too deep", strings.Repeat(`{"a":`, 100000) + "1" + strings.Repeat("}", 100000), whole("deeper than 64 levels"), nil},
		{"unbalanced deep nesting", strings.Repeat("[", 1<<20), whole("deeper than 64 levels"), nil},

		// Empty batches.
		{"empty array", `[]`, whole("batch has no operations"), nil},
		{"empty envelope", `{"batch":[]}`, whole("batch has no operations"), nil},
		{"empty batch field", `{"batch":[ ]}`, whole("batch has no operations"), nil},
		{"no items", `{"operation":{"path":"/a"},"items":[]}`, whole("batch has no operations"), nil},

		// The envelope.
		{"empty object", `{}`, whole(`missing "batch"`), nil},
		{"missing batch", `{"mode":"parallel"}`, whole(`missing "batch"`), nil},
		{"batch not an array", `{"batch":{"path":"/a"}}`, whole(`"batch" must be an array of operations`), nil},
		{"requests is not native", `{"requests":[{"path":"/a"}]}`, whole(`unknown field "requests"`), nil},
		{"batch null", `{"batch":null}`, whole(`"batch" must be an array of operations`), nil},
		{"batch twice", `{"batch":[{"path":"/a"}],"batch":[{"path":"/b"}]}`, whole(`field "batch" given twice`), nil},
		{"batch twice", `{"batch":[{"path":"/a"}],"batch":[{"path":"/b"}]}`, whole(`field "batch" given twice`), nil},
		{"mode twice", `{"batch":[{"path":"/a"}],"mode":"parallel","mode":"parallel"}`, whole(`field "mode" given twice`), nil},
		{"unknown envelope field", `{"batch":[{"path":"/a"}],"transactional":true}`, whole(`unknown field "transactional"`), nil},
		{"bad mode", `{"batch":[{"path":"/a"}],"mode":"fast"}`, whole(`mode must be "sequential" or "parallel", got "fast"`), nil},
		{"mode not a string", `{"batch":[{"path":"/a"}],"mode":1}`, whole(`mode must be "sequential" or "parallel", got 1`), nil},
		{"mode wrong case", `{"batch":[{"path":"/a"}],"mode":"Parallel"}`, whole(`mode must be`), nil},
		{"bad atomicity", `{"batch":[{"path":"/a"}],"atomicity":"some"}`, whole(`atomicity must be "none", "stop_on_error" or "all_or_nothing", got "some"`), nil},
		{"async not a bool", `{"batch":[{"path":"/a"}],"async":"yes"}`, whole(`async must be true or false, got "yes"`), nil},
		{"dry_run not a bool", `{"batch":[{"path":"/a"}],"dry_run":1}`, whole(`dry_run must be true or false, got 1`), nil},
		{"include_headers not a bool", `{"batch":[{"path":"/a"}],"include_headers":null}`, whole(`include_headers must be true or false`), nil},
		{"items without operation", `{"batch":[{"path":"/a"}],"items":[1]}`, whole(`"items" needs "operation"`), nil},
		{"operation without items", `{"operation":{"path":"/a"}}`, whole(`"operation" needs "items"`), nil},
		{"operation and batch", `{"operation":{"path":"/a"},"items":[1],"batch":[{"path":"/a"}]}`, whole(`give either "batch" or "operation" with "items", not both`), nil},
		{"items not an array", `{"operation":{"path":"/a"},"items":{"a":1}}`, whole(`"items" must be an array`), nil},
		{"several envelope faults", `{"batch":{},"mode":"x","atomicity":"y","bogus":1}`,
			[]ptFault{{-1, "", `"batch" must be an array`}, {-1, "", "mode must be"}, {-1, "", "atomicity must be"}, {-1, "", `unknown field "bogus"`}}, nil},

		// The operation object.
		{"operation not an object", `[{"path":"/a"},1,"x",[]]`,
			[]ptFault{{1, "1", "operation must be a JSON object"}, {2, "2", "operation must be a JSON object"}, {3, "3", "operation must be a JSON object"}}, nil},
		{"unknown field", op(`"path":"/a","verb":"GET"`), at(1, "x", `unknown field "verb"`), nil},
		{"field in wrong case", op(`"Path":"/a"`), at(1, "x", `unknown field "Path"`), nil},
		{"path twice", `[{"path":"/a","path":"/b"}]`, at(0, "0", `field "path" given twice`), nil},
		{"path and url", `[{"path":"/a","url":"/b"}]`, at(0, "0", `field "url" given twice (or with an alias)`), nil},
		{"url and relative_url", `[{"url":"/a","relative_url":"/b"}]`, at(0, "0", `field "relative_url" given twice`), nil},
		{"id and name", `[{"id":"a","name":"b","path":"/a"}]`, at(0, "a", `field "name" given twice`), nil},
		{"body twice", op(`"path":"/a","body":1,"body":2`), at(1, "x", `field "body" given twice`), nil},
		{"depends_on and dependsOn", `[{"id":"a","path":"/a"},{"id":"b","path":"/b","depends_on":["a"],"dependsOn":["a"]}]`, at(1, "b", `field "dependsOn" given twice`), nil},

		// Ids.
		{"id not a string", `[{"path":"/a"},{"id":7,"path":"/b"}]`, at(1, "1", "id must be a string, got 7"), nil},
		{"name not a string", `[{"name":null,"path":"/b"}]`, at(0, "0", "name must be a string, got null"), nil},
		{"empty id", `[{"id":"","path":"/a"}]`, at(0, "", `id "" must be 1 to 128 letters`), nil},
		{"id with a dot", `[{"id":"a.b","path":"/a"}]`, at(0, "a.b", `id "a.b" must be`), nil},
		{"id with braces", `[{"id":"{{a}}","path":"/a"}]`, at(0, "{{a}}", "must be 1 to 128"), nil},
		{"id with a space", `[{"id":"a b","path":"/a"}]`, at(0, "a b", "must be 1 to 128"), nil},
		{"id too long", `[{"id":"` + strings.Repeat("a", 129) + `","path":"/a"}]`, at(0, strings.Repeat("a", 128)+"…", "must be 1 to 128"), nil}, // echoed cut short
		{"duplicate id", `[{"id":"a","path":"/a"},{"path":"/b"},{"id":"a","path":"/c"}]`, at(2, "a", `id "a" is already used by operation 0`), nil},
		{"id taken by a default id", `[{"path":"/a"},{"id":"0","path":"/b"}]`, at(1, "0", `id "0" is already used by operation 0`), nil},
		{"default id taken by an id", `[{"id":"1","path":"/a"},{"path":"/b"}]`, at(1, "1", `id "1" is already used by operation 0`), nil},

		// Methods.
		{"method not a string", op(`"method":1,"path":"/a"`), at(1, "x", "method must be a string, got 1"), nil},
		{"method with a space", op(`"method":"GE T","path":"/a"`), at(1, "x", `method "GE T" is not a valid HTTP method`), nil},
		{"empty method", op(`"method":"","path":"/a"`), at(1, "x", `method "" is not a valid HTTP method`), nil},
		{"method with CRLF", op(`"method":"GET\r\nX","path":"/a"`), at(1, "x", "is not a valid HTTP method"), nil},
		{"method not allowed", op(`"method":"TRACE","path":"/a"`), at(1, "x", "method TRACE is not allowed here"), nil},
		{"lower-case method not allowed", op(`"method":"connect","path":"/a"`), at(1, "x", "method CONNECT is not allowed here"), nil},
		{"OPTIONS not allowed by default", op(`"method":"OPTIONS","path":"/a"`), at(1, "x", "method OPTIONS is not allowed here"), nil},
		// strings.ToUpper folds "ſ" (U+017F) to "S": a method that is no
		// token must not come out as POST.
		{"non-ASCII method folding to POST", op(`"method":"poſt","path":"/a"`), at(1, "x", "method"), nil},

		// Targets.
		{"no path", op(`"method":"GET"`), at(1, "x", "path is required"), nil},
		{"empty path", op(`"path":""`), at(1, "x", "path is required"), nil},
		{"path not a string", op(`"path":["/a"]`), at(1, "x", `path must be a string, got ["/a"]`), nil},
		{"url not a string", op(`"url":5`), at(1, "x", "url must be a string, got 5"), nil},
		{"absolute-form", op(`"path":"http://x/"`), at(1, "x", `path must be origin-form, got "http://x/"`), nil},
		{"network-path", op(`"url":"//x/a"`), at(1, "x", `path must be origin-form, got "//x/a"`), nil},
		{"relative path", op(`"relative_url":"me/feed"`), at(1, "x", `path must be origin-form, got "me/feed"`), nil},
		{"backslash", op(`"path":"/a\\b"`), at(1, "x", `path must not hold '\'`), nil},
		{"CRLF", op(`"path":"/a\r\nHost: x"`), at(1, "x", "path must not hold control characters or spaces"), nil},
		{"encoded NUL", op(`"path":"/a%00"`), at(1, "x", "path must not encode control characters"), nil},
		{"dot-segment", op(`"path":"/a/../b"`), at(1, "x", "path must not hold dot-segments"), nil},
		{"encoded dot-segment", op(`"path":"/a/%2e%2e/b"`), at(1, "x", "path must not hold dot-segments"), nil},
		{"fragment", op(`"path":"/a#b"`), at(1, "x", "path must not hold a fragment"), nil},
		{"bad escape", op(`"path":"/a%g0"`), at(1, "x", "invalid percent-escape"), nil},
		{"path not allowed", `[{"path":"/users/1"},{"id":"x","path":"/admin"}]`, at(1, "x", `path "/admin" is not allowed here`), limPaths},
		{"path outside by prefix", `[{"id":"x","path":"/usersx"}]`, at(0, "x", `path "/usersx" is not allowed here`), limPaths},
		{"path before a reference", `[{"id":"a","path":"/a"},{"id":"x","path":"//{{a.body.host}}/b"}]`, at(1, "x", "path must be origin-form"), nil},

		// Headers.
		{"headers not an object", op(`"path":"/a","headers":"X-A: 1"`), at(1, "x", `headers must be an object, got "X-A: 1"`), nil},
		{"headers an array", op(`"path":"/a","headers":[["X-A","1"]]`), at(1, "x", "headers must be an object"), nil},
		{"header name not a token", op(`"path":"/a","headers":{"X A":"1"}`), at(1, "x", `header name "X A" is not a valid token`), nil},
		{"empty header name", op(`"path":"/a","headers":{"":"1"}`), at(1, "x", `header name "" is not a valid token`), nil},
		{"header value with LF", op(`"path":"/a","headers":{"X-A":"1\nX-B: 2"}`), at(1, "x", "header X-A has a value with control characters"), nil},
		{"header value number", op(`"path":"/a","headers":{"X-A":1}`), at(1, "x", "header X-A must be a string or an array of strings, got 1"), nil},
		{"header value object", op(`"path":"/a","headers":{"X-A":{}}`), at(1, "x", "header X-A must be a string or an array of strings"), nil},
		{"header list with a number", op(`"path":"/a","headers":{"X-A":["1",2]}`), at(1, "x", "header X-A: values must be strings, got 2"), nil},
		{"header twice", op(`"path":"/a","headers":{"X-A":"1","x-a":"2"}`), at(1, "x", "header X-A given twice"), nil},

		// Bodies.
		{"body_encoding not base64", op(`"path":"/a","body":"AA==","body_encoding":"hex"`), at(1, "x", `body_encoding must be "base64", got "hex"`), nil},
		{"body_encoding not a string", op(`"path":"/a","body":"AA==","body_encoding":true`), at(1, "x", `body_encoding must be "base64", got true`), nil},
		{"bad base64", op(`"path":"/a","body":"!!!!","body_encoding":"base64"`), at(1, "x", "body is not valid base64"), nil},
		{"unpadded base64", op(`"path":"/a","body":"AAE","body_encoding":"base64"`), at(1, "x", "body is not valid base64"), nil},
		{"base64 of an object", op(`"path":"/a","body":{"a":1},"body_encoding":"base64"`), at(1, "x", `body_encoding "base64" needs a string body`), nil},
		{"base64 with no body", op(`"path":"/a","body_encoding":"base64"`), at(1, "x", "body_encoding needs a body"), nil},
		{"base64 with a null body", op(`"path":"/a","body":null,"body_encoding":"base64"`), at(1, "x", "body_encoding needs a body"), nil},

		// Dependencies.
		{"unknown dependency", `[{"id":"a","path":"/a","depends_on":["zz"]}]`, at(0, "a", `depends_on names unknown operation "zz"`), nil},
		{"self dependency", `[{"id":"a","path":"/a","depends_on":"a"}]`, at(0, "a", "operation cannot depend on itself"), nil},
		{"self dependency by default id", `[{"path":"/a"},{"path":"/b","depends_on":["1"]}]`, at(1, "1", "operation cannot depend on itself"), nil},
		{"depends_on a number", op(`"path":"/a","depends_on":1`), at(1, "x", "depends_on must be an array of operation ids, got 1"), nil},
		{"depends_on an object", op(`"path":"/a","depends_on":{"id":"0"}`), at(1, "x", "depends_on must be an array of operation ids"), nil},
		{"depends_on holding a number", op(`"path":"/a","depends_on":["0",0]`), at(1, "x", "depends_on must hold operation ids (strings), got 0"), nil},
		{"forward dependency in sequential mode", `[{"id":"a","path":"/a","depends_on":["b"]},{"id":"b","path":"/b"}]`,
			at(0, "a", `depends on "b", which comes later`), nil},
		{"forward dependency under stop_on_error", `{"mode":"parallel","atomicity":"stop_on_error","batch":[{"id":"a","path":"/a","depends_on":["b"]},{"id":"b","path":"/b"}]}`,
			at(0, "a", `depends on "b", which comes later`), nil},
		{"cycle", `{"mode":"parallel","batch":[{"id":"a","path":"/a","depends_on":["b"]},{"id":"b","path":"/b","depends_on":["a"]}]}`,
			at(0, "a", "dependency cycle: a -> b -> a"), nil},
		{"cycle of three", `{"mode":"parallel","batch":[{"id":"a","path":"/a","depends_on":"c"},{"id":"b","path":"/b","dependsOn":"a"},{"id":"c","path":"/c","depends_on":["b"]}]}`,
			at(0, "a", "dependency cycle: a -> c -> b -> a"), nil},
		{"cycle behind a good operation", `{"mode":"parallel","batch":[{"id":"r","path":"/r","depends_on":["x"]},{"id":"x","path":"/x","depends_on":["y"]},{"id":"y","path":"/y","depends_on":["x"]}]}`,
			at(1, "x", "dependency cycle: x -> y -> x"), nil},
		{"two cycles", `{"mode":"parallel","batch":[{"id":"a","path":"/a","depends_on":["b"]},{"id":"b","path":"/b","depends_on":["a"]},{"id":"c","path":"/c","depends_on":["d"]},{"id":"d","path":"/d","depends_on":["c"]}]}`,
			[]ptFault{{0, "a", "dependency cycle: a -> b -> a"}, {2, "c", "dependency cycle: c -> d -> c"}}, nil},
		{"cycle through a reference", `{"mode":"parallel","batch":[{"id":"a","path":"/a/{{b.status}}"},{"id":"b","path":"/b","headers":{"X-A":"{{a.headers.Etag}}"}}]}`,
			at(0, "a", "dependency cycle: a -> b -> a"), nil},
		{"reference to an unknown id", op(`"path":"/a/{{zz.body.id}}"`), at(1, "x", `reference {{zz.body.id}} names unknown operation "zz"`), nil},
		{"reference to itself", op(`"path":"/a","body":{"v":"{{x.status}}"}`), at(1, "x", "an operation cannot refer to its own answer"), nil},
		{"malformed reference", op(`"path":"/a/{{0.bogus}}"`), at(1, "x", "must be {{ID.status}}"), nil},

		// Rollbacks.
		{"rollback not an object", op(`"path":"/a","rollback":"DELETE /a"`), at(1, "x", "rollback: operation must be a JSON object"), nil},
		{"rollback with an id", op(`"path":"/a","rollback":{"id":"r","path":"/a"}`), at(1, "x", `rollback: field "id" has no place in a rollback`), nil},
		{"rollback with depends_on", op(`"path":"/a","rollback":{"path":"/a","depends_on":["0"]}`), at(1, "x", `rollback: field "depends_on" has no place`), nil},
		{"rollback of a rollback", op(`"path":"/a","rollback":{"path":"/a","rollback":{"path":"/b"}}`), at(1, "x", `field "rollback" has no place`), nil},
		{"rollback bad path", op(`"path":"/a","rollback":{"method":"DELETE","path":"/a/../b"}`), at(1, "x", "rollback: path must not hold dot-segments"), nil},
		{"rollback bad method", op(`"path":"/a","rollback":{"method":"PURGE","path":"/a"}`), at(1, "x", "rollback: method PURGE is not allowed"), nil},
		{"rollback unknown reference", op(`"path":"/a","rollback":{"path":"/a/{{nope.body.id}}"}`), at(1, "x", `rollback: reference {{nope.body.id}} names unknown operation "nope"`), nil},

		// The bulk form: faults of the template are the whole batch's; of an
		// item, that item's operation's.
		{"bulk template not an object", `{"operation":"POST /a","items":[1]}`, whole("operation must be a JSON object"), nil},
		{"bulk body template with base64", `{"operation":{"method":"POST","path":"/a","body":{},"body_encoding":"base64"},"items":["AA=="]}`, whole("body_encoding applies to the items"), nil},
		{"bulk item template unclosed", `{"operation":{"path":"/a/{{item.id"},"items":[{}]}`, whole("is not closed"), nil},
		{"bulk item template modifier", `{"operation":{"path":"/a/{{item.@reverse}}"},"items":[{}]}`, whole("GJSON modifiers"), nil},
		{"bulk item template long path", `{"operation":{"path":"/a/{{item.a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q}}"},"items":[{}]}`, whole("more than 16 components"), nil},
		{"bulk item template empty", `{"operation":{"path":"/a/{{item.}}"},"items":[{}]}`, whole("needs a path into the item"), nil},
		{"bulk item template many", `{"operation":{"path":"/a","body":{"v":"` + strings.Repeat("{{item.a}}", 65) + `"}},"items":[{}]}`, whole("more than 64 item references"), nil},
		{"bulk item missing", `{"operation":{"path":"/a/{{item.id}}"},"items":[{"id":1},{"name":"x"}]}`, at(1, "1", `path: no "id" in the item`), nil},
		{"bulk item makes a bad path", `{"operation":{"path":"{{item.p}}"},"items":[{"p":"/ok"},{"p":"//evil/"}]}`, at(1, "1", "path must be origin-form"), nil},
		{"bulk item header control", `{"operation":{"path":"/a","headers":{"X-A":"{{item.h}}"}},"items":[{"h":"a\r\nb"}]}`, at(0, "0", "header X-A has control characters"), nil},
		{"bulk item key too long", `{"operation":{"path":"/a","key":"{{item.k}}"},"items":[{"k":"` + strings.Repeat("k", 257) + `"}]}`, at(0, "0", "key is longer than 256 bytes"), nil},
		{"key too long", op(`"path":"/a","key":"` + strings.Repeat("k", 257) + `"`), at(1, "x", "key must be a string of at most 256 bytes"), nil},
		{"key not a string", op(`"path":"/a","key":7`), at(1, "x", "key must be a string"), nil},
		{"bulk template with depends_on", `{"operation":{"method":"POST","path":"/a","depends_on":["x"]},"items":[1]}`, whole("the operation of a bulk batch cannot have depends_on"), nil},
		{"bulk template bad path", `{"operation":{"method":"POST","path":"http://x/a"},"items":[1]}`, whole("path must be origin-form"), nil},
		{"bulk template bad method", `{"operation":{"method":"TRACE","path":"/a"},"items":[1]}`, whole("method TRACE is not allowed"), nil},
		{"bulk template refused header", `{"operation":{"method":"POST","path":"/a","headers":{"Host":"x"}},"items":[1]}`, whole("header Host may not be set"), nil},
		{"bulk template with a rollback", `{"operation":{"method":"POST","path":"/a","rollback":{"method":"DELETE","path":"/a"}},"items":[1]}`, whole("bulk"), nil},
		{"bulk template unknown field", `{"operation":{"method":"POST","path":"/a","bogus":1},"items":[1]}`, whole(`unknown field "bogus"`), nil},
		{"bulk item bad base64", `{"operation":{"method":"POST","path":"/a","body_encoding":"base64"},"items":["AA==","%%","AA=="]}`, at(1, "1", "body is not valid base64"), nil},
		{"bulk object item with base64", `{"operation":{"method":"POST","path":"/a","body_encoding":"base64"},"items":["AA==",{"a":1}]}`, at(1, "1", `body_encoding "base64" needs a string body`), nil},
		{"bulk null item with base64", `{"operation":{"method":"POST","path":"/a","body_encoding":"base64"},"items":[null]}`, at(0, "0", "body_encoding needs a body"), nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := tc.lim
			if l == nil {
				l = lim
			}
			faults := ptFaults(t, l, tc.body)
			ptMatchFaults(t, tc.body, faults, tc.want)
			for _, f := range faults {
				if f.Message == "" || f.Index < -1 {
					t.Errorf("malformed fault %+v", f)
				}
			}
		})
	}

	// Each header an operation may not set is refused by name, in any case.
	for _, name := range []string{"Host", "content-length", "Transfer-Encoding", "CONNECTION", "Upgrade", "Keep-Alive", "TE", "Trailer",
		"Proxy-Authorization", "proxy-connection", "X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method"} {
		t.Run("refused header "+name, func(t *testing.T) {
			body := op(`"path":"/a","headers":{"` + name + `":"v"}`)
			ptMatchFaults(t, body, ptFaults(t, lim, body), at(1, "x", "header "+http.CanonicalHeaderKey(name)+" may not be set by an operation"))
		})
	}
}

// A batch with many bad operations lists every fault, each with its
// operation's index and id, and only those.
func TestParseListsAllFaults(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, nil)
	body := `[
		{"id":"ok","path":"/a"},
		{"id":"p","path":"http://x/"},
		{"id":"m","method":"FLY","path":"/b"},
		{"path":"/c","headers":{"Host":"x"},"body":"!!","body_encoding":"base64"},
		{"id":"ok","path":"/d"},
		{"id":"d","path":"/e","depends_on":["nope"]},
		{"id":"fine","method":"DELETE","path":"/f"}
	]`
	want := []ptFault{
		{1, "p", `path must be origin-form, got "http://x/"`},
		{2, "m", "method FLY is not allowed here"},
		{3, "3", "header Host may not be set"},
		{3, "3", "body is not valid base64"},
		{4, "ok", `id "ok" is already used by operation 0`},
		{5, "d", `depends_on names unknown operation "nope"`},
	}
	faults := ptFaults(t, lim, body)
	if len(faults) != len(want) {
		t.Errorf("%d faults, want %d:%s", len(faults), len(want), ptDump(faults))
	}
	ptMatchFaults(t, body, faults, want)

	// One operation with several faults has them all.
	body = `[{"id":"a.b","method":"GE T","path":"//x","headers":{"Host":"h","X-A":1},"body":{},"body_encoding":"base64","bogus":1}]`
	faults = ptFaults(t, lim, body)
	ptMatchFaults(t, body, faults, []ptFault{
		{0, "a.b", `unknown field "bogus"`},
		{0, "a.b", "must be 1 to 128"},
		{0, "a.b", "is not a valid HTTP method"},
		{0, "a.b", "header Host may not be set"},
		{0, "a.b", "header X-A must be a string"},
		{0, "a.b", `needs a string body`},
		{0, "a.b", "path must be origin-form"},
	})

	// A dependency cycle is listed along with the other faults.
	body2 := `{"mode":"parallel","batch":[{"id":"a","path":"/a","depends_on":["b"]},{"id":"b","path":"/b","depends_on":["a"]},{"id":"c","path":"http://x/"}]}`
	ptMatchFaults(t, body2, ptFaults(t, lim, body2), []ptFault{
		{2, "c", "path must be origin-form"},
		{0, "a", "dependency cycle: a -> b -> a"},
	})

	// The error message names every fault too.
	if msg := faults.Error(); !strings.HasPrefix(msg, "invalid batch: ") || strings.Count(msg, "; ") != len(faults)-1 {
		t.Errorf("error message %q", msg)
	}
}

func TestParseMaxOps(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, &Handler{MaxOps: 3})
	ops := func(n int) string {
		return "[" + strings.TrimSuffix(strings.Repeat(`{"path":"/a"},`, n), ",") + "]"
	}
	if b := ptParse(t, lim, ops(3)); len(b.ops) != 3 {
		t.Errorf("3 of 3: %d ops", len(b.ops))
	}
	cases := map[string]string{
		"array":    ops(4),
		"envelope": `{"batch":` + ops(10) + `}`,
		"bulk":     `{"operation":{"method":"POST","path":"/a"},"items":[1,2,3,4]}`,
		// Counted before any operation is looked at.
		"bad operations": `[1,2,3,4,5]`,
	}
	for name, body := range cases {
		t.Run(name, func(t *testing.T) {
			b, err := parseBatch(context.Background(), []byte(body), lim)
			var tooMany tooManyOpsError
			if b != nil || !errors.As(err, &tooMany) || tooMany.max != 3 || tooMany.n <= 3 {
				t.Fatalf("got %v, %T %v; want tooManyOpsError", b != nil, err, err)
			}
			if !strings.Contains(err.Error(), "more than the 3 allowed") {
				t.Errorf("message %q", err)
			}
		})
	}
	// A fault of the envelope comes before counting.
	body := `{"batch":` + ops(10) + `,"mode":"x"}`
	ptMatchFaults(t, body, ptFaults(t, lim, body), []ptFault{{-1, "", "mode must be"}})
}

func TestParseNesting(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, nil)
	nest := func(depth int) string {
		// The batch array and the operation are two levels.
		return `[{"path":"/a","body":` + strings.Repeat(`[`, depth-2) + strings.Repeat(`]`, depth-2) + `}]`
	}
	if b := ptParse(t, lim, nest(maxJSONDepth)); len(b.ops[0].body) != 2*(maxJSONDepth-2) {
		t.Errorf("body of %d bytes", len(b.ops[0].body))
	}
	body := nest(maxJSONDepth + 1)
	ptMatchFaults(t, body, ptFaults(t, lim, body), []ptFault{{-1, "", "nests JSON deeper than 64 levels"}})

	// Brackets in strings are text, not nesting.
	deepText := strings.Repeat("[{", 1000)
	b := ptParse(t, lim, `[{"path":"/a","body":"`+deepText+`","headers":{"X-A":"`+strings.Repeat("]", 100)+`"}}]`)
	if string(b.ops[0].body) != deepText {
		t.Error("string body with brackets changed")
	}
	// Escaped quotes do not end a string early.
	ptParse(t, lim, `[{"path":"/a","body":"\"[[[[\\\"`+strings.Repeat("[", 100)+`"}]`)
}

// Validation is linear in the body: nested percent-encodings are decoded a
// bounded number of rounds (each costs the path's length), and a run of
// "{{" is looked at a bounded distance ahead.
func TestParseLinearInBody(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, &Handler{MaxOps: 10})
	// "%25" decodes to "%": "/x/%2525…25" takes one round per "25".
	nested := func(k int) string { return "/x/%25" + strings.Repeat("25", k) }
	if b := ptParse(t, lim, `[{"path":"`+nested(2)+`"}]`); b.ops[0].url == nil {
		t.Error("three rounds of encoding are accepted")
	}
	faults := ptFaults(t, lim, `[{"path":"`+nested(30_000)+`"}]`)
	if len(faults) != 1 || !strings.Contains(faults[0].Message, "percent-encoded more than 4 times") || len(faults[0].Message) > maxFaultMessage+3 {
		t.Errorf("nested encodings: %.300s", ptDump(faults))
	}

	// References keep their meaning, looked for a bounded way ahead.
	for s, want := range map[string]string{
		"{{{a.body}}":                        "", // "{{" then "{a": no id
		"{{ {{a.body}}":                      "{{a.body}}",
		"{{a.body":                           "",
		"x {{a}} {{a.status}}":               "{{a.status}}",
		strings.Repeat("{{", 300_000) + "}}": "",
		strings.Repeat("{{a", 100_000):       "",
	} {
		ps, msg := parsePieces(s)
		var got []string
		for _, p := range ps {
			if p.ref != nil {
				got = append(got, p.ref.raw)
			}
		}
		if msg != "" || strings.Join(got, " ") != want {
			t.Errorf("%.40q: refs %q, message %q; want %q", s, got, msg, want)
		}
	}
	long := "{{a.body." + strings.Repeat("x", maxRefPart) + "}}"
	if _, msg := parsePieces(long); !strings.Contains(msg, "not closed within 256 bytes") {
		t.Errorf("a reference past the bound: %q", msg)
	}
	if _, msg := parsePieces(strings.Repeat("{{a.", 200_000) + "}}"); msg == "" {
		t.Error(`"{{a." runs with a far "}}": no message`)
	}
}

// A client that goes away stops the parse.
func TestParseStopsWhenClientGoes(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, &Handler{MaxOps: 100_000})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	body := "[" + strings.Repeat(`{"path":"/a"},`, 99_999) + `{"path":"/a"}]`
	if b, err := parseBatch(ctx, []byte(body), lim); !errors.Is(err, context.Canceled) || b != nil {
		t.Errorf("parse after the client left: %v", err)
	}
}

// Validation happens before anything runs: every fault is listed, and the
// backend sees nothing (serveAlone fails a test that sends anything on).
func TestValidationLeavesBackendUntouched(t *testing.T) {
	t.Parallel()
	h := handlerAlone(t, &Handler{MaxOps: 3, MaxBodySize: 2000, Methods: []string{"GET", "POST"}, Paths: []string{"/users", "/users/*"}})

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
			ptRefused(t, serveAlone(t, h, request(t, "POST", "http://127.0.0.1/batch", tc.body)), tc.status, tc.want)
		})
	}

	// The fault names the operation's index and id.
	w := serveAlone(t, h, request(t, "POST", "http://127.0.0.1/batch", `[{"path":"/users"},{"id":"x","path":"/a/../b"}]`))
	f := mustJSON(t, w.Body.String()).Get("errors.0")
	if f.Get("index").Int() != 1 || f.Get("id").String() != "x" {
		t.Errorf("fault must name index and id: %s", f.Raw)
	}
}

// The 400 that lists the faults of a batch is not a way to make the server
// produce (and hold) many times what the client sent: a body of repeated
// bad fields must not be answered with a fault per repetition.
func TestFaultListBounded(t *testing.T) {
	t.Parallel()
	h := hostileHandler(t)
	body := `[{"path":"/users",` + strings.Repeat(`"x":0,`, 50_000) + `"y":0}]` // 300 KB
	start := time.Now()
	w := serveAlone(t, h, request(t, "POST", "http://127.0.0.1/batch", body))
	status, answer := w.Code, w.Body.String()
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
}

// Faults quote what they refuse cut short: a 2 MB invalid id and 120
// unknown fields of 16 KB once made a 200 MB answer.
func TestFaultEchoesCutShort(t *testing.T) {
	t.Parallel()
	h := handlerAlone(t, nil)
	var sb strings.Builder
	sb.WriteString(`[{"id":"` + strings.Repeat("i", 2<<20) + `","path":"/users/` + strings.Repeat("p", 1<<20) + `/../x"`)
	for i := range 120 {
		fmt.Fprintf(&sb, `,"%s%d":0`, strings.Repeat("f", 16<<10), i)
	}
	sb.WriteString(`}]`)
	w := serveAlone(t, h, request(t, "POST", "http://127.0.0.1/batch", sb.String()))
	status, answer := w.Code, w.Body.String()
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
}
