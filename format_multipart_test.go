package batch

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"

	"github.com/tidwall/gjson"
)

// part is one part of a multipart answer, as Go's own reader reads it.
type part struct {
	header http.Header // the part's
	resp   *http.Response
	body   string
	inner  []part // a changeset's parts
}

// readParts reads a multipart/mixed answer with the standard library.
func readParts(t *testing.T, ct string, body []byte) []part {
	t.Helper()
	mt, params, err := mime.ParseMediaType(ct)
	if err != nil || mt != "multipart/mixed" {
		t.Fatalf("Content-Type %q: %v", ct, err)
	}
	if bytes.Count(body, []byte("\n--")) != bytes.Count(body, []byte("\r\n--")) {
		t.Errorf("answer has delimiter lines not ended by CRLF")
	}
	r := multipart.NewReader(bytes.NewReader(body), params["boundary"])
	var parts []part
	for {
		p, err := r.NextPart()
		if errors.Is(err, io.EOF) {
			return parts
		}
		if err != nil {
			t.Fatalf("reading parts: %v", err)
		}
		raw, _ := io.ReadAll(p)
		pt := part{header: http.Header(p.Header)}
		if ct := p.Header.Get("Content-Type"); strings.HasPrefix(ct, "multipart/mixed") {
			pt.inner = readParts(t, ct, raw)
		} else {
			resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(raw)), nil)
			if err != nil {
				t.Fatalf("part is no HTTP response: %v\n%s", err, raw)
			}
			b, _ := io.ReadAll(resp.Body)
			pt.resp, pt.body = resp, string(b)
		}
		parts = append(parts, pt)
	}
}

func sendMultipart(t *testing.T, url, boundary, body string, headers ...string) (int, http.Header, []byte) {
	t.Helper()
	status, hdr, resp := send(t, "POST", url, body, append([]string{`Content-Type: multipart/mixed; boundary="` + boundary + `"`}, headers...)...)
	return status, hdr, []byte(resp)
}

// As Google's client writes a batch: LF line endings, a quoted boundary,
// Content-IDs "<base + n>", a Host and a Content-Length in each request.
func TestMultipartAsGoogle(t *testing.T) {
	be := newBackend(t)
	be.seed("Ann")
	base := startCaddy(t, proxySite(be, ""))
	host := strings.TrimPrefix(base, "http://")
	const b = "===============7153=="
	body := "--" + b + "\n" +
		"Content-Type: application/http\nMIME-Version: 1.0\nContent-Transfer-Encoding: binary\nContent-ID: <4e0c + 1>\n\n" +
		"GET /users/1?alt=json HTTP/1.1\nContent-Type: application/json\nMIME-Version: 1.0\naccept: application/json\naccept-encoding: gzip, deflate\nHost: " + host + "\n\n\n" +
		"--" + b + "\n" +
		"Content-Type: application/http\nMIME-Version: 1.0\nContent-Transfer-Encoding: binary\nContent-ID: <4e0c + 2>\n\n" +
		"POST /users?alt=json HTTP/1.1\nContent-Type: application/json\nHost: " + host + "\ncontent-length: 13\n\n{\"name\":\"Bo\"}\n" +
		"--" + b + "\n" +
		"Content-Type: application/http\nContent-ID: <4e0c + 3>\n\n" +
		"DELETE /users/999 HTTP/1.1\nHost: " + host + "\n\n\n" +
		"--" + b + "--\n"
	status, hdr, answer := sendMultipart(t, base+"/batch", b, body)
	if status != 200 {
		t.Fatalf("status %d: %s", status, answer)
	}
	parts := readParts(t, hdr.Get("Content-Type"), answer)
	if len(parts) != 3 {
		t.Fatalf("%d parts: %s", len(parts), answer)
	}
	for i, want := range []struct {
		id     string
		status int
		body   string
	}{{"<response-4e0c + 1>", 200, `"name":"Ann"`}, {"<response-4e0c + 2>", 201, `"name":"Bo"`}, {"<response-4e0c + 3>", 404, "no such user"}} {
		p := parts[i]
		if p.header.Get("Content-Type") != "application/http" || p.header.Get("Content-ID") != want.id ||
			p.resp.StatusCode != want.status || !strings.Contains(p.body, want.body) || p.resp.Status == "" {
			t.Errorf("part %d: %v %s %q", i, p.header, p.resp.Status, p.body)
		}
	}
	if got := parts[1].resp.Header.Get("Location"); got != "/users/2" {
		t.Errorf("headers of the answer: Location %q", got)
	}
	for _, r := range be.requests() {
		if r.Header.Get("Accept-Encoding") == "gzip, deflate" || strings.Contains(r.Path, "batch") {
			t.Errorf("a part's request reached the API as %s %s %v", r.Method, r.Path, r.Header)
		}
	}
}

// An OData changeset is an atomicity group: "$1" is the Location of the
// changeset's first answer; it is answered nested, and when it fails, by
// its failure alone, what ran of it rolled back.
func TestMultipartChangesets(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	changeset := func(cs string, parts ...string) string {
		s := "--batch\r\nContent-Type: multipart/mixed; boundary=" + cs + "\r\n\r\n"
		for _, p := range parts {
			s += "--" + cs + "\r\nContent-Type: application/http\r\n" + p
		}
		return s + "--" + cs + "--\r\n"
	}
	body := changeset("cs1",
		"Content-ID: 1\r\n\r\nPOST /users HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{\"name\":\"Cy\"}\r\n",
		"Content-ID: 2\r\n\r\nPATCH $1 HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{\"balance\":3}\r\n") +
		changeset("cs2",
			"Content-ID: 3\r\n\r\nPOST /users HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{\"name\":\"Dee\",\"rb\":1}\r\n",
			"Content-ID: 4\r\n\r\nPOST /users HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{}\r\n") +
		"--batch\r\nContent-Type: application/http\r\nContent-ID: 5\r\n\r\nGET /users HTTP/1.1\r\n\r\n\r\n--batch--\r\n"
	status, hdr, answer := sendMultipart(t, base+"/batch", "batch", body)
	if status != 200 {
		t.Fatalf("status %d: %s", status, answer)
	}
	parts := readParts(t, hdr.Get("Content-Type"), answer)
	if len(parts) != 3 || len(parts[0].inner) != 2 || parts[1].inner != nil {
		t.Fatalf("want a nested changeset, a lone failure and a part: %s", answer)
	}
	if p := parts[0].inner[1]; p.header.Get("Content-ID") != "2" || p.resp.StatusCode != 200 || !strings.Contains(p.body, `"balance":3`) {
		t.Errorf("$1 in the changeset: %v %q %v", p.resp.Status, p.body, be.requests())
	}
	if p := parts[1]; p.header.Get("Content-ID") != "4" || p.resp.StatusCode != 422 {
		t.Errorf("a failed changeset is its failure alone: %v %v %q", p.header, p.resp.Status, p.body)
	}
	if p := parts[2]; p.resp.StatusCode != 200 {
		t.Errorf("the part after: %v", p.resp.Status)
	}
}

// What the native rules refuse stays refused, and the reader is bounded:
// all refused whole, with a JSON error, and nothing reaches the backend
// (serveAlone fails a test that sends anything on).
func TestMultipartRefused(t *testing.T) {
	t.Parallel()
	h := handlerAlone(t, &Handler{MaxOps: 3})
	const host = "batch.example"
	multipart := func(body string) *http.Request {
		return request(t, "POST", "http://"+host+"/batch", body, `Content-Type: multipart/mixed; boundary="b"`)
	}
	req := func(lines ...string) string {
		return "--b\r\nContent-Type: application/http\r\n\r\n" + strings.Join(lines, "\r\n") + "\r\n--b--\r\n"
	}
	for name, c := range map[string]struct {
		body, want string
		status     int
	}{
		"other host":           {req("GET /users HTTP/1.1", "Host: evil.example", "", ""), "is not the batch request's", 400},
		"absolute, elsewhere":  {req("GET http://evil.example/users HTTP/1.1", "", ""), "on another host", 400},
		"length mismatch":      {req("POST /users HTTP/1.1", "Content-Length: 99", "", "{}"), "does not match", 400},
		"framing header":       {req("POST /users HTTP/1.1", "Transfer-Encoding: chunked", "", "{}"), "may not be set", 400},
		"dot-segments":         {req("GET /users/../admin HTTP/1.1", "", ""), "dot-segments", 400},
		"no request line":      {req("hello", "", ""), "request line", 400},
		"not application/http": {"--b\r\nContent-Type: text/plain\r\n\r\nGET /users HTTP/1.1\r\n\r\n\r\n--b--\r\n", "application/http", 400},
		"unterminated":         {"--b\r\nContent-Type: application/http\r\n\r\nGET /users HTTP/1.1\r\n\r\n", "close delimiter", 400},
		"no part":              {"hello", "no part", 400},
		"huge headers":         {req("GET /users HTTP/1.1", "X-Big: "+strings.Repeat("x", 70<<10), "", ""), "headers longer than", 400},
		"nested changesets": {"--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\nContent-Type: multipart/mixed; boundary=d\r\n\r\n--d--\r\n--c--\r\n--b--\r\n",
			"do not nest", 400},
		"too many": {strings.Repeat("--b\r\nContent-Type: application/http\r\n\r\nGET /users HTTP/1.1\r\n\r\n\r\n", 4) + "--b--\r\n", "more than the 3 allowed", 413},
	} {
		w := serveAlone(t, h, multipart(c.body))
		status, answer := w.Code, w.Body.Bytes()
		if status != c.status || !strings.Contains(string(answer), c.want) || !gjson.ValidBytes(answer) {
			t.Errorf("%s: %d %s", name, status, answer)
		}
	}
	// The batch's own Host is taken (TestMultipartAsGoogle runs such parts).
	req0 := req("GET /users HTTP/1.1", "Host: "+host, "", "")
	if b, err := multipartMixed.decode(multipart(req0), []byte(req0), &h.rules); err != nil || len(b.ops) != 1 {
		t.Errorf("the batch's own Host: %v", err)
	}
}

func TestSplitMultipart(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		body  string
		parts []string
		msg   string
	}{
		{"--b\r\nA\r\n--b\r\nB\r\n--b--", []string{"A", "B"}, ""},
		{"preamble\r\n--b\nA\n--b--\nepilogue", []string{"A"}, ""},
		{"--b  \r\nA\r\n--b--", []string{"A"}, ""},
		{"--b\r\nA --b\r\n--b--", []string{"A --b"}, ""}, // a boundary mid-line is data
		{"--b\r\n\r\n--b--", []string{""}, ""},
		{"--bx\r\nA\r\n--b--", nil, "more than the boundary"},
		{"--b\r\nA", nil, "close delimiter"},
		{"A", nil, "no part"},
	} {
		parts, msg := splitMultipart([]byte(c.body), "b")
		var got []string
		for _, p := range parts {
			got = append(got, string(p))
		}
		if strings.Join(got, "|") != strings.Join(c.parts, "|") || !strings.Contains(msg, c.msg) || (msg == "") != (c.msg == "") {
			t.Errorf("%q: parts %q, message %q", c.body, got, msg)
		}
	}
	if _, msg := splitMultipart([]byte("--x"), strings.Repeat("b", 71)); msg == "" {
		t.Error("a boundary of 71 characters")
	}
}

// FuzzParseMultipart feeds bodies to the multipart decoder: it refuses
// them with faults or accepts them with operations whose targets are
// checked, and never panics.
func FuzzParseMultipart(f *testing.F) {
	for _, s := range []string{
		"--b\r\nContent-Type: application/http\r\nContent-ID: 1\r\n\r\nGET /users HTTP/1.1\r\n\r\n\r\n--b--\r\n",
		"--b\nContent-Type: multipart/mixed; boundary=c\n\n--c\nContent-Type: application/http\n\nPOST $1/x HTTP/1.1\nContent-Length: 2\n\n{}\n--c--\n--b--\n",
		"--b\r\nContent-Type: application/http\r\n\r\nGET http://h/a b?c=d HTTP/1.1\r\nHost: h\r\n\r\n\r\n--b--",
		"--b\r\n" + strings.Repeat("X: y\r\n", 200) + "\r\n--b--", "--b--", "",
	} {
		f.Add(s)
	}
	lim := ptLimits(f, &Handler{MaxOps: 20})
	f.Fuzz(func(t *testing.T, body string) {
		r := httptest.NewRequest(http.MethodPost, "http://h/batch", strings.NewReader(body)).WithContext(context.Background())
		r.Header.Set("Content-Type", "multipart/mixed; boundary=b")
		b, err := multipartMixed.decode(r, []byte(body), lim)
		if err != nil {
			fzCheckRefusal(t, b, err, lim)
			return
		}
		fzCheckBatch(t, b, lim)
	})
}

// A multipart batch sent async serves its results as multipart, and an
// Idempotency-Key replays the multipart answer.
func TestMultipartAsyncAndIdempotent(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	const body = "--b\r\nContent-Type: application/http\r\nContent-ID: <x + 1>\r\n\r\nGET /health HTTP/1.1\r\n\r\n\r\n--b--\r\n"
	status, hdr, answer := sendMultipart(t, base+"/batch", "b", body, alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("submit: %d %s", status, answer)
	}
	job := base + hdr.Get("Location")
	waitJob(t, job, alice, "completed")
	status, hdr, res := send(t, "GET", job+"/results", "", alice)
	if parts := readParts(t, hdr.Get("Content-Type"), []byte(res)); status != 200 || len(parts) != 1 ||
		parts[0].header.Get("Content-ID") != "<response-x + 1>" || parts[0].resp.StatusCode != 200 || !strings.Contains(parts[0].body, "ok") {
		t.Errorf("results of a multipart job: %d %s", status, res)
	}
	_, hdr1, first := sendMultipart(t, base+"/batch", "b", body, alice, "Idempotency-Key: m1")
	_, hdr2, again := sendMultipart(t, base+"/batch", "b", body, alice, "Idempotency-Key: m1")
	if hdr2.Get("Idempotent-Replayed") != "true" || !bytes.Equal(first, again) || hdr2.Get("Content-Type") != hdr1.Get("Content-Type") {
		t.Errorf("replay: %v %q", hdr2, again)
	}
}

// A multipart batch over max_ops is refused 413 having read no more than
// max_ops parts, whether they stand alone or in one changeset: a
// changeset used to be split, and its parts' headers read, whole before
// it was counted (one 9.4 MB body of tiny parts grew memory by 270 MiB).
func TestMultipartPartsCounted(t *testing.T) {
	const maxOps, parts = 100, 100000
	lim := ptLimits(t, &Handler{MaxOps: maxOps})
	tiny := strings.Repeat("--c\r\nContent-Type: application/http\r\n\r\nGET /a HTTP/1.1\r\n\r\n\r\n", parts) + "--c--\r\n"
	for name, body := range map[string]string{
		"one changeset": "--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n" + tiny + "--b--\r\n",
		"top level":     strings.ReplaceAll(tiny, "--c", "--b"),
		"empty changesets": strings.Repeat("--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c--\r\n", parts) +
			"--b--\r\n",
	} {
		r := httptest.NewRequest(http.MethodPost, "http://h/batch", nil)
		r.Header.Set("Content-Type", "multipart/mixed; boundary=b")
		raw := []byte(body)
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		_, err := multipartMixed.decode(r, raw, lim)
		runtime.ReadMemStats(&after)
		var tooMany tooManyOpsError
		if !errors.As(err, &tooMany) {
			t.Errorf("%s: %v, want too many operations", name, err)
		}
		// What a hundred parts cost, not what a hundred thousand do.
		mallocs, bytes := after.Mallocs-before.Mallocs, after.TotalAlloc-before.TotalAlloc
		t.Logf("%s: %d bytes in %d parts: %d allocations, %d bytes", name, len(body), parts, mallocs, bytes)
		if mallocs > 20*maxOps || bytes > 1<<20 {
			t.Errorf("%s: %d allocations of %d bytes for max_ops %d", name, mallocs, bytes, maxOps)
		}
	}
}

// A part's request line is bounded as its headers are: its spaces become
// "%20", and an 8 MB line of them allocated 117 MB and was sent on.
func TestMultipartRequestLineBounded(t *testing.T) {
	lim := ptLimits(t, &Handler{MaxBodySize: 16 << 20})
	for _, c := range []struct {
		pairs int // of " a" in the path
		fault bool
	}{{1000, false}, {4 << 20, true}} {
		body := []byte("--b\r\nContent-Type: application/http\r\n\r\nGET /" + strings.Repeat(" a", c.pairs) + " HTTP/1.1\r\n\r\n\r\n--b--\r\n")
		r := httptest.NewRequest(http.MethodPost, "http://h/batch", nil)
		r.Header.Set("Content-Type", "multipart/mixed; boundary=b")
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		_, err := multipartMixed.decode(r, body, lim)
		runtime.ReadMemStats(&after)
		alloc := after.TotalAlloc - before.TotalAlloc
		if c.fault != (err != nil) || c.fault && !strings.Contains(err.Error(), "request line longer than 65536 bytes") {
			t.Errorf("a request line of %d bytes: %v", len(body), err)
		}
		if c.fault && alloc > 1<<20 {
			t.Errorf("refusing a request line of %d bytes allocated %d", len(body), alloc)
		}
	}
}

// OData clients put blank lines after GET and DELETE parts: such a part
// has no body, and the API gets none, nor a Content-Length. A body ends
// where its Content-Length says, blank lines after it aside.
func TestMultipartBlankLineBodies(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	be.seed("Ann", "Bo")
	part := func(id, request string) string {
		return "--batch_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: " + id + "\r\n\r\n" + request
	}
	for _, c := range []struct {
		name, body string
		want       []string // method, path and body the API saw
	}{
		{"blank lines", part("1", "GET /users/1 HTTP/1.1\r\nAccept: application/json\r\n\r\n\r\n\r\n") +
			part("2", "DELETE /users/2 HTTP/1.1\r\n\r\n\n\r\n\r\n") +
			part("3", "GET /users HTTP/1.1\r\n\r\n\r\n") + "--batch_1--\r\n",
			[]string{"GET /users/1 ", "DELETE /users/2 ", "GET /users "}},
		{"Content-Length", part("4", "POST /users HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"name\":\"C\"}\r\n\r\n\r\n") +
			part("5", "GET /users/1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n\r\n\r\n") + "--batch_1--\r\n",
			[]string{`POST /users {"name":"C"}`, "GET /users/1 "}},
	} {
		before := len(be.requests())
		status, hdr, answer := sendMultipart(t, base+"/batch", "batch_1", c.body)
		if status != 200 {
			t.Errorf("%s: status %d: %s", c.name, status, answer)
			continue
		}
		for i, p := range readParts(t, hdr.Get("Content-Type"), answer) {
			if p.resp.StatusCode >= 300 {
				t.Errorf("%s: part %d: %s %q", c.name, i, p.resp.Status, p.body)
			}
		}
		var got []string
		for _, r := range be.requests()[before:] {
			got = append(got, r.Method+" "+r.Path+" "+string(r.Body))
			if cl := r.Header.Get("Content-Length"); r.Method != "POST" && cl != "" {
				t.Errorf("%s: %s %s came with Content-Length %s", c.name, r.Method, r.Path, cl)
			}
		}
		if strings.Join(got, "|") != strings.Join(c.want, "|") {
			t.Errorf("%s: the API saw %q, want %q", c.name, got, c.want)
		}
	}
}

// OData V2 clients (SAP's) send DataServiceVersion or MaxDataServiceVersion
// and need a batch answered 202 Accepted ([MS-ODATA] 2.2.7.6.6), with
// DataServiceVersion 1.0 as its example has it; others get 200, as OData
// V4 says.
func TestMultipartODataV2Accepted(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	be.seed("Ann")
	const body = "--batch_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n" +
		"GET /users/1 HTTP/1.1\r\nAccept: application/json\r\nDataServiceVersion: 2.0\r\n\r\n\r\n--batch_1--\r\n"
	for _, c := range []struct {
		headers []string
		status  int
		dsv     string
	}{
		{[]string{"DataServiceVersion: 2.0", "MaxDataServiceVersion: 2.0"}, 202, "1.0"},
		{[]string{"MaxDataServiceVersion: 3.0"}, 202, "1.0"},
		{[]string{"OData-Version: 4.0"}, 200, ""},
		{nil, 200, ""},
	} {
		before := len(be.requests())
		status, hdr, answer := sendMultipart(t, base+"/batch", "batch_1", body, c.headers...)
		parts := readParts(t, hdr.Get("Content-Type"), answer)
		if status != c.status || hdr.Get("DataServiceVersion") != c.dsv || len(parts) != 1 || parts[0].resp.StatusCode != 200 ||
			!strings.Contains(parts[0].body, `"name":"Ann"`) {
			t.Errorf("%v: %d DataServiceVersion %q: %s", c.headers, status, hdr.Get("DataServiceVersion"), answer)
		}
		if seen := be.requests()[before:]; len(seen) != 1 || seen[0].Path != "/users/1" || seen[0].Header.Get("DataServiceVersion") != "2.0" {
			t.Errorf("%v: the API saw %v", c.headers, seen)
		}
	}
	// Its 202 is an answer an Idempotency-Key keeps: a repeat is replayed,
	// not run again.
	before := len(be.requests())
	for i := range 2 {
		status, hdr, _ := sendMultipart(t, base+"/batch", "batch_1", body, "DataServiceVersion: 2.0", alice, "Idempotency-Key: v2-once")
		if status != 202 || hdr.Get("Idempotent-Stored") == "false" || (i == 1) != (hdr.Get("Idempotent-Replayed") == "true") {
			t.Errorf("send %d with a key: %d %v", i+1, status, hdr)
		}
	}
	if n := len(be.requests()) - before; n != 1 {
		t.Errorf("a V2 batch sent twice with one Idempotency-Key ran %d times", n)
	}
}

// splitMultipart returns the bodies of the parts of a multipart body, a
// message when it is malformed: all a partSplitter finds.
func splitMultipart(body []byte, boundary string) ([][]byte, string) {
	s, msg := newPartSplitter(body, boundary)
	if msg != "" {
		return nil, msg
	}
	var parts [][]byte
	for part, ok := s.next(); ok; part, ok = s.next() {
		parts = append(parts, part)
	}
	if s.err != "" {
		return nil, s.err
	}
	return parts, ""
}
