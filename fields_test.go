package batch

import (
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"testing"
)

func TestParseForwardedHeaders(t *testing.T) {
	t.Parallel()
	body := `[{"path":"/a","headers":{"X-Forwarded-For":"6.6.6.6","x-real-ip":"6.6.6.6","Forwarded":"for=6.6.6.6",
		"X-Forwarded-Proto":"https","X-Forwarded-Host":"evil","X-Keep":"yes","X-Forwarded":"not a forwarded-* header"}}]`
	cases := []struct {
		name  string
		allow []string
		want  http.Header
	}{
		{"dropped by default", nil, http.Header{"X-Keep": {"yes"}, "X-Forwarded": {"not a forwarded-* header"}}},
		{"some allowed", []string{"x-forwarded-proto", "Forwarded"}, http.Header{
			"X-Keep": {"yes"}, "X-Forwarded": {"not a forwarded-* header"}, "X-Forwarded-Proto": {"https"}, "Forwarded": {"for=6.6.6.6"}}},
		{"all allowed", []string{"X-Forwarded-For", "X-Real-IP", "Forwarded", "X-Forwarded-Proto", "X-Forwarded-Host"}, http.Header{
			"X-Keep": {"yes"}, "X-Forwarded": {"not a forwarded-* header"}, "X-Forwarded-Proto": {"https"}, "Forwarded": {"for=6.6.6.6"},
			"X-Forwarded-For": {"6.6.6.6"}, "X-Real-Ip": {"6.6.6.6"}, "X-Forwarded-Host": {"evil"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			lim := ptLimits(t, &Handler{AllowForwardedHeaders: tc.allow})
			b := ptParse(t, lim, body)
			if !reflect.DeepEqual(b.ops[0].header, tc.want) {
				t.Errorf("headers %v\nwant %v", b.ops[0].header, tc.want)
			}
			// In a rollback too.
			rb := ptParse(t, lim, `[{"path":"/a","rollback":{"path":"/b","headers":{"X-Forwarded-For":"1.1.1.1","X-Keep":"1"}}}]`).ops[0].rollback
			_, kept := rb.header["X-Forwarded-For"]
			if kept != (len(tc.allow) == 5) || rb.header.Get("X-Keep") != "1" {
				t.Errorf("rollback headers %v", rb.header)
			}
		})
	}
	// A dropped header is still checked.
	lim := ptLimits(t, nil)
	bad := `[{"path":"/a","headers":{"X-Forwarded-For":"1\r\n2"}}]`
	ptMatchFaults(t, bad, ptFaults(t, lim, bad), []ptFault{{0, "0", "header X-Forwarded-For has a value with control characters"}})
}

func TestParseTarget(t *testing.T) {
	t.Parallel()
	good := []struct{ target, path, query string }{
		{"/", "/", ""},
		{"/users", "/users", ""},
		{"/users/42/", "/users/42/", ""},
		{"/users?", "/users", ""},
		{"/users?limit=5&sort=-name", "/users", "limit=5&sort=-name"},
		{"/search?q=a%20b&x=%2e%2e%2f", "/search", "q=a%20b&x=%2e%2e%2f"},
		{"/files/a%20b", "/files/a b", ""},
		{"/caf%C3%A9/%E2%82%AC", "/café/€", ""},
		{"/café", "/café", ""},
		{"/a%2Fb", "/a/b", ""},
		{"/a%3Bb", "/a;b", ""},
		{"/a;b=c/d", "/a;b=c/d", ""},
		{"/.well-known/openid-configuration", "/.well-known/openid-configuration", ""},
		{"/a..b/...", "/a..b/...", ""},
		{"/a/.b/..c/c..", "/a/.b/..c/c..", ""},
		{"/a/%2e%2ex", "/a/..x", ""},
		{"/users/{{a.body.id}}", "/users/{{a.body.id}}", ""},
		{"/~user/a-b_c.d!$&'()*+,=:@", "/~user/a-b_c.d!$&'()*+,=:@", ""},
		{"/a?x=\xc3\xa9&y=\x80", "/a", "x=\xc3\xa9&y=\x80"},
		// A percent sign, encoded as it should be, is no escape of its own.
		{"/files/50%25off", "/files/50%off", ""},
		{"/discount/100%25", "/discount/100%", ""},
	}
	for _, tc := range good {
		u, msg := parseTarget(tc.target)
		if msg != "" || u == nil {
			t.Errorf("%q refused: %s", tc.target, msg)
			continue
		}
		if u.Path != tc.path || u.RawQuery != tc.query || u.Host != "" || u.Scheme != "" || u.Fragment != "" {
			t.Errorf("%q: path %q query %q host %q scheme %q, want path %q query %q", tc.target, u.Path, u.RawQuery, u.Host, u.Scheme, tc.path, tc.query)
		}
	}

	bad := map[string]string{
		"empty":                "path is required",
		"users":                "origin-form",
		"*":                    "origin-form",
		"http://x/":            "origin-form",
		"HTTPS://x/a":          "origin-form",
		"x.example:443":        "origin-form",
		"//x/a":                "origin-form",
		"//":                   "origin-form",
		"///a":                 "origin-form",
		"/a\\b":                `'\'`,
		"\\\\x\\a":             "origin-form",
		"/a%5cb":               "control characters or '\\'",
		"/a%5Cb":               "control characters or '\\'",
		"/a%255cb":             "control characters or '\\'",
		"/a\rb":                "control characters",
		"/a\nb":                "control characters",
		"/a\x00b":              "control characters",
		"/a\tb":                "control characters",
		"/a\x7fb":              "control characters",
		"/a b":                 "spaces",
		"/a?q=a b":             "spaces",
		"/a?q=\n":              "control characters",
		"/a%00b":               "encode control characters",
		"/a%0db":               "encode control characters",
		"/a%0Ab":               "encode control characters",
		"/a%0D%0AHost:%20x":    "encode control characters",
		"/a%7f":                "encode control characters",
		"/a%2500":              "encode control characters",
		"/a/../b":              "dot-segments",
		"/a/./b":               "dot-segments",
		"/..":                  "dot-segments",
		"/.":                   "dot-segments",
		"/a/..":                "dot-segments",
		"/a/.":                 "dot-segments",
		"/a/..?x=1":            "dot-segments",
		"/a/%2e%2e/b":          "dot-segments",
		"/a/%2E%2E/b":          "dot-segments",
		"/a/%2e/b":             "dot-segments",
		"/a/.%2e/b":            "dot-segments",
		"/a/%2e./b":            "dot-segments",
		"/a%2f..%2fb":          "dot-segments",
		"/a%2F%2e%2e%2Fb":      "dot-segments",
		"/a/%252e%252e/b":      "dot-segments",
		"/a/%252E%252E":        "dot-segments",
		"/a/%25252e%25252e/b":  "dot-segments",
		"/a/..;/b":             "dot-segments",
		"/a/..;jsessionid=1/b": "dot-segments",
		"/a/%2e%2e%3bx/b":      "dot-segments",
		"/a#frag":              "fragment",
		"/a?b#frag":            "fragment",
		"/a%":                  "invalid percent-escape",
		"/a%zz":                "invalid percent-escape",
		"/a%2":                 "invalid percent-escape",
		"/a?x=%zz\x01":         "control characters",
		// However the fix for "/files/50%25off" goes, this must stay refused:
		// a backend that decodes twice, leniently, sees "/a/../%zz".
		"/a/%252e%252e/%25zz":       "",
		"/a/%2e%2e%2f%2e%2e/etc":    "dot-segments",
		"/static/..%5c..%5cwindows": "control characters or '\\'",
	}
	for target, want := range bad {
		if target == "empty" {
			target = ""
		}
		u, msg := parseTarget(target)
		if msg == "" || u != nil {
			t.Errorf("%q accepted as %v", target, u)
			continue
		}
		if !strings.Contains(msg, want) {
			t.Errorf("%q: message %q, want %q in it", target, msg, want)
		}
	}
}

// Every printable byte, in the path and in the query: an accepted target
// parses as url.ParseRequestURI parses it (the parser builds plain paths'
// URLs itself).
func TestParseTargetAgreesWithNetURL(t *testing.T) {
	t.Parallel()
	for c := byte(0x21); c < 0x7f; c++ {
		for _, target := range []string{
			"/a" + string(c) + "b", "/a" + string(c), "/" + string(c), "/a/b?x" + string(c) + "y",
			"/a" + string(c) + "b?", "/a?" + string(c), "/a" + string(c) + "?q=1&r",
		} {
			u, msg := parseTarget(target)
			if msg != "" {
				continue
			}
			want, err := url.ParseRequestURI(target)
			if err != nil || !reflect.DeepEqual(u, want) {
				t.Errorf("%q parsed as %#v, url.ParseRequestURI makes %#v (%v)", target, u, want, err)
			}
		}
	}
}

var fzTargetSeeds = []string{
	"/", "/users/1?x=%20&y=/../", "/a/%2e%2e/b", "/a/%252e%252E/b", "/a/%25252e%25252e", "/a/..;x/b", "/a%2f..%2fb",
	"//x", "http://x/", "/a\\b", "/a%5c", "/a%00", "/a%0d%0a", "/a#f", "/a b", "/é", "/files/50%25off", "/a%", "/.well-known/x",
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
