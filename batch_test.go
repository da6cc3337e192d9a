package batch

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

func fuzzLimits(f *testing.F) *limits {
	h := &Handler{Paths: []string{"/users", "/users/*", "/x/*"}}
	if err := h.Provision(caddy.Context{Context: context.Background()}); err != nil {
		f.Fatal(err)
	}
	return &h.limits
}

// FuzzParseBatch: parsing never panics; a batch is either refused with at
// least one fault (400) or too many operations (413), or accepted with
// operations that are safe to send.
func FuzzParseBatch(f *testing.F) {
	for _, seed := range []string{
		`[{"method":"POST","path":"/users","body":{"name":"Alice"}},{"method":"PUT","path":"/users/42","body":{"email":"a@b"}},{"method":"DELETE","path":"/users/15"}]`,
		`{"requests":[{"name":"a","url":"/users"},{"id":"b","relative_url":"/users/{{a.body.0.id}}","dependsOn":["a"]}],"mode":"parallel"}`,
		`{"operation":{"method":"POST","path":"/users","headers":{"X-Source":"crm"}},"items":[{"name":"A"},"text",1,null]}`,
		`{"atomicity":"all_or_nothing","batch":[{"id":"c","method":"POST","path":"/users","rollback":{"method":"DELETE","path":"/users/{{c.body.id}}"}}]}`,
		`[{"path":"/users/%2e%2e/x"},{"path":"//evil/"},{"path":"/users","headers":{"Host":"x","X-A":["1","2"]}}]`,
		`[{"path":"/x/..;/y","body":"AAEC","body_encoding":"base64"}]`,
		`{"batch":[{"id":"a","path":"/users","depends_on":["b"]},{"id":"b","path":"/users","depends_on":["a"]}],"mode":"parallel"}`,
		`[]`, `{}`, `[[[[[[]]]]]]`, `"x"`,
	} {
		f.Add(seed)
	}
	lim := fuzzLimits(f)
	f.Fuzz(func(t *testing.T, body string) {
		b, err := parseBatch([]byte(body), lim)
		if err != nil {
			var faults badBatchError
			var tooMany tooManyOpsError
			switch {
			case errors.As(err, &faults):
				if len(faults) == 0 || len(faults) > maxFaults+1 {
					t.Fatalf("%d faults", len(faults))
				}
			case errors.As(err, &tooMany):
			default:
				t.Fatalf("refused without faults: %T %v", err, err)
			}
			return
		}
		ids := map[string]bool{}
		for i, op := range b.ops {
			if ids[op.id] || !validID(op.id) {
				t.Fatalf("op %d: id %q invalid or repeated", i, op.id)
			}
			ids[op.id] = true
			if _, ok := lim.methods[op.method]; !ok {
				t.Fatalf("op %d: method %q not allowed", i, op.method)
			}
			if op.tmpl == nil || op.tmpl.target == nil {
				if op.url == nil {
					t.Fatalf("op %d: no URL", i)
				}
				if _, msg := parseTarget(op.target); msg != "" {
					t.Fatalf("op %d: accepted target %q: %s", i, op.target, msg)
				}
			}
			for _, d := range op.deps {
				if d < 0 || d >= len(b.ops) || d == i || (b.mode == modeSequential && d > i) {
					t.Fatalf("op %d: dependency %d", i, d)
				}
			}
			for name := range op.header {
				if refusedHeaders[name] || strings.HasPrefix(name, "Proxy-") || isForwardedHeader(name) {
					t.Fatalf("op %d: header %s let through", i, name)
				}
			}
		}
	})
}

// FuzzParseTarget: an accepted target cannot name another host or climb out
// of its path, however it is encoded.
func FuzzParseTarget(f *testing.F) {
	for _, seed := range []string{"/users", "/users/1?x=%20&y", "/a/%2e%2e/b", "/a/%252e%252e", "//x", "http://x/", "/a\\b", "/a/..;/b", "/%00", "/é"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, target string) {
		u, msg := parseTarget(target)
		if msg != "" {
			return
		}
		if u == nil || !strings.HasPrefix(target, "/") || strings.HasPrefix(target, "//") || strings.ContainsAny(target, "\\\r\n\x00#") {
			t.Fatalf("accepted %q", target)
		}
		if u.Host != "" || u.Scheme != "" {
			t.Fatalf("%q names a host: %+v", target, u)
		}
		p, _, _ := strings.Cut(target, "?")
		for range 3 {
			p = strings.NewReplacer("%2e", ".", "%2E", ".", "%2f", "/", "%2F", "/", "%25", "%").Replace(p)
		}
		for _, seg := range strings.Split(p, "/") {
			seg, _, _ = strings.Cut(seg, ";")
			if seg == "." || seg == ".." {
				t.Fatalf("%q holds a dot-segment", target)
			}
		}
	})
}
