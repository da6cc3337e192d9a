package batch

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-batch/batch/examples/legacyapi"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"github.com/tidwall/gjson"
)

// The tests run a real Caddy in process, in front of a real backend. Caddy
// holds one global config, so tests that start it do not run in parallel.

// seen is one request as the backend received it.
type seen struct {
	Method string
	Path   string
	Header http.Header
	Body   []byte
}

// backend is the legacy users API with a few endpoints for fault tests, and a
// log of every request it received.
type backend struct {
	*httptest.Server
	API *legacyapi.API

	mu   sync.Mutex
	reqs []seen
	// events logs "start ID" and "end ID" of /slow?id=ID requests, and
	// inFlight/maxInFlight count them, for ordering assertions that do not
	// depend on timing.
	events      []string
	inFlight    int
	maxInFlight int
	limited     map[string]int // calls to /limited by id
}

func newBackend(t *testing.T) *backend {
	t.Helper()
	b := &backend{API: legacyapi.New()}
	b.Server = httptest.NewServer(http.HandlerFunc(b.serve))
	t.Cleanup(b.Close)
	return b
}

func (b *backend) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	b.mu.Lock()
	b.reqs = append(b.reqs, seen{Method: r.Method, Path: r.URL.RequestURI(), Header: r.Header.Clone(), Body: body})
	b.mu.Unlock()
	r.Body = io.NopCloser(bytes.NewReader(body))

	q := r.URL.Query()
	p := r.URL.Path
	if strings.HasPrefix(p, "/echo/") {
		p = "/echo"
	}
	switch p {
	case "/echo":
		// What arrived, as JSON, so tests can assert on the sub-request.
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"method": r.Method, "uri": r.URL.RequestURI(), "host": r.Host,
			"headers": r.Header, "body": string(body), "body_b64": body, "length": r.ContentLength,
		})
	case "/slow":
		if id := q.Get("id"); id != "" {
			b.mu.Lock()
			b.events = append(b.events, "start "+id)
			b.inFlight++
			b.maxInFlight = max(b.maxInFlight, b.inFlight)
			b.mu.Unlock()
			defer func() {
				b.mu.Lock()
				b.events = append(b.events, "end "+id)
				b.inFlight--
				b.mu.Unlock()
			}()
		}
		d, _ := time.ParseDuration(q.Get("d"))
		select {
		case <-time.After(d):
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"slept":"`+d.String()+`"}`)
		case <-r.Context().Done():
		}
	case "/big":
		n, _ := strconv.Atoi(q.Get("n"))
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write(bytes.Repeat([]byte("x"), n))
	case "/limited":
		// Answers 429 to the first n requests for an id, then 200.
		n, _ := strconv.Atoi(q.Get("n"))
		b.mu.Lock()
		if b.limited == nil {
			b.limited = map[string]int{}
		}
		b.limited[q.Get("id")]++
		calls := b.limited[q.Get("id")]
		b.mu.Unlock()
		if calls <= n {
			w.Header().Set("Retry-After", q.Get("after"))
			w.WriteHeader(http.StatusTooManyRequests)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"calls":`+strconv.Itoa(calls)+`}`)
	case "/text":
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = io.WriteString(w, "hello \"batch\"\n")
	case "/binary":
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = w.Write([]byte{0xff, 0x00, 0xfe, 0x01})
	case "/badjson":
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"broken":`)
	default:
		b.API.ServeHTTP(w, r)
	}
}

// seed creates users directly in the API, bypassing Caddy and the log.
func (b *backend) seed(names ...string) {
	for _, n := range names {
		b.API.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/users", strings.NewReader(`{"name":"`+n+`"}`)))
	}
}

// requests returns what the backend has received so far.
func (b *backend) requests() []seen {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]seen(nil), b.reqs...)
}

// eventLog returns the /slow start and end events so far.
func (b *backend) eventLog() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.events...)
}

// addr is the backend's host:port, for reverse_proxy.
func (b *backend) addr() string { return strings.TrimPrefix(b.URL, "http://") }

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startCaddy runs a Caddyfile site block on a free loopback port and returns
// its base URL. site may use {PORT}; its directives follow the site address.
func startCaddy(t *testing.T, site string) string {
	t.Helper()
	return startCaddyIn(t, t.TempDir(), site)
}

// startCaddyIn is startCaddy with the storage root given.
func startCaddyIn(t *testing.T, storage, site string) string {
	t.Helper()
	port := freePort(t)
	return loadCaddy(t, adapt(t, testCaddyfile(storage, port, "", site)), port)
}

// testCaddyfile is a whole Caddyfile: the tests' global options (quiet, no
// admin, no HTTPS, storage under storage) with global added, and site served
// on port. site may use {PORT}.
func testCaddyfile(storage string, port int, global, site string) string {
	return fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
	storage file_system %s
	http_port %d
	log {
		level ERROR
	}
	%s
}
http://127.0.0.1:%d {
%s
}
`, storage, port, global, port, strings.ReplaceAll(site, "{PORT}", strconv.Itoa(port)))
}

// adapt turns a Caddyfile into JSON config.
func adapt(t *testing.T, cfg string) []byte {
	t.Helper()
	cfgJSON, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
	if err != nil {
		t.Fatalf("adapting Caddyfile: %v\n%s", err, cfg)
	}
	for _, w := range warnings {
		if !strings.Contains(w.Message, "not formatted") {
			t.Logf("Caddyfile warning: %s", w)
		}
	}
	return cfgJSON
}

// loadCaddy runs a JSON config that listens on port.
func loadCaddy(t *testing.T, cfgJSON []byte, port int) string {
	t.Helper()
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatalf("loading config: %v\n%s", err, cfgJSON)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	for i := 0; ; i++ {
		conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			conn.Close()
			return base
		}
		if i == 50 {
			t.Fatalf("caddy is not listening on %d: %v", port, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// eventually polls cond until it holds, failing the test after d.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

var client = &http.Client{Timeout: 30 * time.Second}

// post sends a batch and returns the status, headers and body. headers are
// "Name: value" pairs.
func post(t *testing.T, url, body string, headers ...string) (int, http.Header, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for _, h := range headers {
		name, value, _ := strings.Cut(h, ":")
		req.Header.Set(name, strings.TrimSpace(value))
	}
	return do(t, req)
}

func do(t *testing.T, req *http.Request) (int, http.Header, string) {
	t.Helper()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, string(b)
}

// mustJSON fails the test unless s is valid JSON, and returns it parsed.
func mustJSON(t *testing.T, s string) gjson.Result {
	t.Helper()
	if !gjson.Valid(s) {
		t.Fatalf("answer is not valid JSON: %s", s)
	}
	return gjson.Parse(s)
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// Test-only handlers, to put a panic or a slow handler in the chain.
func init() {
	caddy.RegisterModule(panicHandler{})
	httpcaddyfile.RegisterHandlerDirective("test_panic", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		h.Next()
		return panicHandler{}, nil
	})
}

// panicHandler panics on every request.
type panicHandler struct{}

func (panicHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.test_panic", New: func() caddy.Module { return panicHandler{} }}
}

func (panicHandler) ServeHTTP(http.ResponseWriter, *http.Request, caddyhttp.Handler) error {
	panic(errors.New("boom"))
}

var _ caddyfile.Unmarshaler = (*Handler)(nil)
