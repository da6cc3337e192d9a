package batch

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-batch/batch/examples/legacyapi"
	_ "github.com/caddy-batch/batch/internal/lagstore" // storage a latency away
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"github.com/caddyserver/certmagic"
	"github.com/tidwall/gjson"
	"go.uber.org/goleak"
)

// The tests run a real Caddy in process, in front of a real backend. Caddy
// holds one global config, so tests that start it do not run in parallel.

// seen is one request as the backend received it.
type seen struct {
	Method string
	Path   string
	Header http.Header
	Body   []byte
	At     time.Time
}

// backend is the legacy users API with a few endpoints for fault tests, and a
// log of every request it received.
type backend struct {
	*httptest.Server
	API *legacyapi.API

	mu   sync.Mutex
	reqs []seen
	// events logs "start ID" and "end ID" of /slow?id=ID and /hold?id=ID
	// requests, and inFlight/maxInFlight count them, for ordering
	// assertions that do not depend on timing.
	events      []string
	inFlight    int
	maxInFlight int
	limited     map[string]int // calls to /limited by id
	// held is closed by release: /hold answers then.
	held        chan struct{}
	releaseOnce sync.Once
}

func newBackend(t *testing.T) *backend {
	t.Helper()
	b := &backend{API: legacyapi.New(), held: make(chan struct{})}
	b.Server = httptest.NewServer(http.HandlerFunc(b.serve))
	t.Cleanup(b.Close)
	return b
}

// release lets every /hold request answer, those to come at once.
func (b *backend) release() { b.releaseOnce.Do(func() { close(b.held) }) }

func (b *backend) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	b.mu.Lock()
	b.reqs = append(b.reqs, seen{Method: r.Method, Path: r.URL.RequestURI(), Header: r.Header.Clone(), Body: body, At: time.Now()})
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
	case "/slow", "/hold":
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
		if p == "/hold" {
			select {
			case <-b.held:
				w.Header().Set("Content-Type", "application/json")
				_, _ = io.WriteString(w, `{"held":true}`)
			case <-r.Context().Done():
			}
			return
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
		// Answers 429 (or status) to the first n requests for an id,
		// then 200.
		n, _ := strconv.Atoi(q.Get("n"))
		b.mu.Lock()
		if b.limited == nil {
			b.limited = map[string]int{}
		}
		b.limited[q.Get("id")]++
		calls := b.limited[q.Get("id")]
		b.mu.Unlock()
		if calls <= n {
			code := http.StatusTooManyRequests
			if s := q.Get("status"); s != "" {
				code, _ = strconv.Atoi(s)
			}
			if q.Has("after") {
				w.Header().Set("Retry-After", q.Get("after"))
			}
			w.WriteHeader(code)
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

// provision provisions h as Caddy would, in a context that ends with the
// test, for tests of the handler's parts without a running Caddy.
func provision(tb testing.TB, h *Handler) *Handler {
	tb.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	tb.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		tb.Fatal(err)
	}
	return h
}

// handlerAlone provisions and validates h (a zero Handler if nil) as Caddy
// would, for tests of what it decides without a running Caddy.
func handlerAlone(tb testing.TB, h *Handler) *Handler {
	tb.Helper()
	if h == nil {
		h = &Handler{}
	}
	provision(tb, h)
	if err := h.Validate(); err != nil {
		tb.Fatal(err)
	}
	return h
}

// serveAlone serves r with h, from handlerAlone, and no Caddy around it:
// for what a batch is answered before any operation runs (refusals, dry
// runs). Nothing may go downstream, where the backend is: the handler
// after batch fails the test.
func serveAlone(t *testing.T, h *Handler, r *http.Request) *httptest.ResponseRecorder {
	t.Helper()
	w := httptest.NewRecorder()
	serveAloneTo(t, h, w, r)
	return w
}

// serveAloneTo is serveAlone, answering into w.
func serveAloneTo(t *testing.T, h *Handler, w http.ResponseWriter, r *http.Request) {
	t.Helper()
	next := caddyhttp.HandlerFunc(func(_ http.ResponseWriter, sub *http.Request) error {
		t.Errorf("%s %s went downstream", sub.Method, sub.URL)
		return nil
	})
	if err := h.ServeHTTP(w, r, next); err != nil {
		t.Fatalf("ServeHTTP: %v", err)
	}
}

// caddyConfig is what the Caddy of a test may differ in.
type caddyConfig struct {
	storage string // root of the file system storage; default: a temporary directory
	flaky   bool   // the storage is test_flaky's, which a test can break
	lag     string // a latency before every storage call (batch_lag)
	global  string // more global options
}

type caddyOption func(*caddyConfig)

// inStorage keeps the Caddy's storage in dir, to share it or look into it.
func inStorage(dir string) caddyOption { return func(c *caddyConfig) { c.storage = dir } }

// withGlobal adds global options, such as server settings.
func withGlobal(g string) caddyOption { return func(c *caddyConfig) { c.global = g } }

// onLaggedStorage puts the storage a latency away, as a cluster's is.
func onLaggedStorage(latency string) caddyOption { return func(c *caddyConfig) { c.lag = latency } }

// onFlakyStorage puts the storage behind test_flaky, which flakyBroken breaks.
func onFlakyStorage(c *caddyConfig) { c.flaky = true }

// startCaddy runs a Caddyfile site block in this process on a free loopback
// port and returns its base URL; Caddy stops when the test ends. site may
// use {PORT}; its directives follow the site address. It is the one way
// tests start Caddy (twoCaddies runs a second one in a child process).
func startCaddy(t *testing.T, site string, opts ...caddyOption) string {
	t.Helper()
	c := caddyConfig{}
	for _, o := range opts {
		o(&c)
	}
	if c.storage == "" {
		c.storage = t.TempDir()
	}
	port := freePort(t)
	cfg := testCaddyfile(c.storage, port, c.global, site)
	if c.flaky {
		cfg = strings.Replace(cfg, "storage file_system", "storage test_flaky", 1)
	}
	if c.lag != "" {
		cfg = strings.Replace(cfg, "storage file_system "+c.storage, "storage batch_lag "+c.storage+" {\n\t\tlatency "+c.lag+"\n\t}", 1)
	}
	return loadCaddy(t, adapt(t, cfg), port)
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
		level {$BATCH_TEST_LOG:ERROR}
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
	// Connections kept from a Caddy stopped before are closed: a POST
	// sent on one fails rather than being tried again.
	client.CloseIdleConnections()
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

// receive waits for a value on ch (or for ch to close), failing the test
// after d.
func receive[T any](t *testing.T, d time.Duration, what string, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("not within %s: %s", d, what)
		panic("unreachable")
	}
}

// waitGroup waits for wg, failing the test after d.
func waitGroup(t *testing.T, d time.Duration, what string, wg *sync.WaitGroup) {
	t.Helper()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	receive(t, d, what, done)
}

var client = &http.Client{Timeout: 30 * time.Second}

// send makes one request and returns its status, headers and body. headers
// are "Name: value" pairs ("" is skipped); a body goes as
// application/json unless they say otherwise. It is the one request
// helper; do sends a request built by hand.
func send(t *testing.T, method, url, body string, headers ...string) (int, http.Header, string) {
	t.Helper()
	return do(t, request(t, method, url, body, headers...))
}

// request is the request send sends, for serveAlone too.
func request(t testing.TB, method, url, body string, headers ...string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for _, h := range headers {
		if h == "" {
			continue
		}
		name, value, _ := strings.Cut(h, ":")
		req.Header.Set(name, strings.TrimSpace(value))
	}
	return req
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

// rawSite is a batch handler in front of a backend that answers each path
// with the status, headers and body of answers[path].
func rawSite(t *testing.T, batchBlock string, answers map[string]func(w http.ResponseWriter)) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if answer, ok := answers[r.URL.Path]; ok {
			answer(w)
			return
		}
		http.NotFound(w, r)
	}))
	t.Cleanup(srv.Close)
	return fmt.Sprintf("\n\tbatch /batch /batch/* %s\n\treverse_proxy %s", batchBlock, srv.Listener.Addr())
}

func jsonAnswer(body []byte) func(w http.ResponseWriter) {
	return func(w http.ResponseWriter) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	}
}

// flakyStorage is caddy.storage.test_flaky: Caddy's file system storage
// whose writes fail while flakyBroken is set.
type flakyStorage struct {
	Root string `json:"root,omitempty"`
}

var flakyBroken atomic.Bool

var errFlaky = errors.New("flaky storage: writes fail")

func init() { caddy.RegisterModule(flakyStorage{}) }

func (flakyStorage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "caddy.storage.test_flaky", New: func() caddy.Module { return new(flakyStorage) }}
}

func (s *flakyStorage) CertMagicStorage() (certmagic.Storage, error) {
	return flakyStore{&certmagic.FileStorage{Path: s.Root}}, nil
}

func (s *flakyStorage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	if !d.AllArgs(&s.Root) {
		return d.ArgErr()
	}
	return nil
}

type flakyStore struct{ *certmagic.FileStorage }

// flakyBeforeStore, when set, sees each key test_flaky is about to store,
// and the storage as it is before the write.
var flakyBeforeStore atomic.Pointer[func(s *certmagic.FileStorage, key string)]

func (s flakyStore) Store(ctx context.Context, key string, value []byte) error {
	if flakyBroken.Load() {
		return errFlaky
	}
	if f := flakyBeforeStore.Load(); f != nil {
		(*f)(s.FileStorage, key)
	}
	return s.FileStorage.Store(ctx, key, value)
}

func (s flakyStore) Delete(ctx context.Context, key string) error {
	if flakyBroken.Load() {
		return errFlaky
	}
	return s.FileStorage.Delete(ctx, key)
}

func (s flakyStore) Lock(ctx context.Context, name string) error {
	if flakyBroken.Load() {
		return errFlaky
	}
	return s.FileStorage.Lock(ctx, name)
}

// thePool is the process's job pool, for tests that look inside it.
func thePool(t *testing.T) *jobPool {
	t.Helper()
	var p *jobPool
	pools.Range(func(_, v any) bool { p, _ = v.(*jobPool); return p == nil })
	if p == nil {
		t.Fatal("no job pool")
	}
	return p
}

// setVar sets *v for the test and restores it after Caddy has stopped
// (cleanups run last first: call it before starting Caddy).
func setVar[T any](t *testing.T, v *T, val T) {
	old := *v
	*v = val
	t.Cleanup(func() { *v = old })
}

func submitJob(t *testing.T, url, body string) string {
	t.Helper()
	status, _, resp := send(t, "POST", url, body, alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("submit: %d %s", status, resp)
	}
	return mustJSON(t, resp).Get("id").String()
}

// goroutinesIn counts goroutines whose stack holds fn.
func goroutinesIn(fn string) int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for g := range bytes.SplitSeq(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte(fn)) {
			n++
		}
	}
	return n
}

// A test binary started with BATCH_TEST_CHILD set runs that Caddyfile as a
// second Caddy instance until killed: Caddy is one per process, and the
// cluster test needs two sharing one storage.
func TestMain(m *testing.M) {
	if cfg := os.Getenv("BATCH_TEST_CHILD"); cfg != "" {
		cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
		if err == nil {
			err = caddy.Load(cfgJSON, true)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		// SIGTERM stops it gracefully, as Caddy's own command does.
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM)
		<-stop
		_ = caddy.Stop()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// twoCaddies runs site in this process and in a child process: two
// instances on one storage. It returns their base URLs and the child.
func twoCaddies(t *testing.T, storage, site string) (a, b string, c child) {
	t.Helper()
	portA, portB := freePort(t), freePort(t)
	a = loadCaddy(t, adapt(t, testCaddyfile(storage, portA, "", site)), portA)
	b, c = startChild(t, testCaddyfile(storage, portB, "", site), portB)
	return a, b, c
}

// child is a Caddy running in a child process; exited is closed once it
// has ended.
type child struct {
	*os.Process
	exited chan struct{}
}

// startChild runs a second Caddy instance in a child process with the
// given full Caddyfile and waits until it listens on port.
func startChild(t *testing.T, cfg string, port int) (string, child) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "BATCH_TEST_CHILD="+cfg)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := child{cmd.Process, make(chan struct{})}
	go func() { _ = cmd.Wait(); close(c.exited) }()
	t.Cleanup(func() {
		_ = c.Kill()
		receive(t, 10*time.Second, "the killed child to end", c.exited)
	})
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	for i := 0; ; i++ {
		if resp, err := client.Get(base + "/"); err == nil {
			resp.Body.Close()
			return base, c
		}
		if i == 200 {
			t.Fatalf("child caddy is not listening on %d", port)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// waitJob polls a job until its status is one of want.
func waitJob(t *testing.T, url string, auth string, want ...string) gjson.Result {
	t.Helper()
	return waitJobFor(t, 20*time.Second, url, auth, want...)
}

// waitJobFor is waitJob for a job that may take up to d.
func waitJobFor(t *testing.T, d time.Duration, url string, auth string, want ...string) gjson.Result {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		status, _, body := send(t, "GET", url, "", auth)
		if status != 200 {
			t.Fatalf("progress: %d %s", status, body)
		}
		p := mustJSON(t, body)
		for _, w := range want {
			if p.Get("status").String() == w {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("job still %s, want %v: %s", p.Get("status"), want, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func asyncSite(b *backend, async string) string {
	return proxySite(b, `{
		max_ops 10000
		async {
			retention 1h
			workers 2
`+async+`
		}
	}`)
}

const alice = "Authorization: Bearer alice"

// proxySite is batch in front of reverse_proxy to the backend, as users run it.
func proxySite(b *backend, batchBlock string) string {
	return fmt.Sprintf(`
	batch /batch /batch/* %s
	reverse_proxy %s`, batchBlock, b.addr())
}

// noLeaks snapshots the goroutines once Caddy and the backends are warm and
// returns a check that no goroutine started since is still alive.
//
// Idle keep-alive connections are not the batch's, and both the snapshot and
// the check close them rather than ignore them: client.CloseIdleConnections
// ends the test client's persistConn loops and so Caddy's server-side conn
// goroutines; closing the backends' client connections ends reverse_proxy's
// persistConn read/write loops (they see EOF) and the backends' own conn
// goroutines.
//
// One goroutine is ignored: right after each config load Caddy's TLS app
// cleans its storage in the background under a storage lock, and certmagic's
// keepLockfileFresh refreshes that lock; it polls every 5s, so it outlives
// the lock by up to 5s and may start after the snapshot. It belongs to the
// config, not to any batch, and nothing outside certmagic can end it.
func noLeaks(t *testing.T, backends ...*httptest.Server) func() {
	t.Helper()
	quiesce := func() {
		client.CloseIdleConnections()
		for _, b := range backends {
			b.CloseClientConnections()
		}
	}
	quiesce()
	opts := []goleak.Option{
		goleak.IgnoreCurrent(),
		goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.keepLockfileFresh"),
	}
	return func() {
		t.Helper()
		quiesce()
		goleak.VerifyNone(t, opts...)
	}
}

// postBody sends a batch body that may hold any bytes; chunked sends it
// without Content-Length.
func postBody(t *testing.T, url string, body []byte, chunked bool) (int, string) {
	t.Helper()
	var r io.Reader = bytes.NewReader(body)
	if chunked {
		r = io.MultiReader(r) // unknown length: the client sends it chunked
	}
	req, err := http.NewRequest(http.MethodPost, url, r)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if chunked && req.ContentLength != 0 {
		t.Fatal("request is not chunked")
	}
	status, _, resp := do(t, req)
	return status, resp
}

// resultCounter counts results in a streamed batch answer without keeping
// it, so that the test's own memory stays out of the measurement.
type resultCounter struct {
	tail      []byte
	n         int64
	results   int
	succeeded int
	last      byte
}

func (c *resultCounter) Write(p []byte) (int, error) {
	joined := append(c.tail, p...)
	count := func(pat string) int {
		k := 0
		for i := 0; ; {
			j := bytes.Index(joined[i:], []byte(pat))
			if j < 0 {
				return k
			}
			if i+j+len(pat) > len(c.tail) { // not counted with the previous write
				k++
			}
			i += j + 1
		}
	}
	c.results += count(`{"id":"`)
	c.succeeded += count(`"status":200`)
	c.tail = append(c.tail[:0], joined[max(0, len(joined)-16):]...)
	c.n += int64(len(p))
	if len(p) > 0 {
		c.last = p[len(p)-1]
	}
	return len(p), nil
}

// liveHeap is the heap in use once garbage is collected.
func liveHeap() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// heapProbe, put in the chain between batch and reverse_proxy, measures the
// live heap after each operation's answer has been captured whole and
// before the batch encodes it: the moment the batch holds most for it.
var heapProbe struct {
	sync.Mutex
	on      bool
	samples []uint64
}

func init() {
	caddy.RegisterModule(heapProbeHandler{})
	httpcaddyfile.RegisterHandlerDirective("test_heap_probe", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		h.Next()
		return heapProbeHandler{}, nil
	})
}

type heapProbeHandler struct{}

func (heapProbeHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.test_heap_probe", New: func() caddy.Module { return new(heapProbeHandler) }}
}

func (heapProbeHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	err := next.ServeHTTP(w, r)
	heapProbe.Lock()
	if heapProbe.on {
		heapProbe.samples = append(heapProbe.samples, liveHeap())
	}
	heapProbe.Unlock()
	return err
}

// faultBackend misbehaves on purpose, one way per path, and counts what it
// was asked.
type faultBackend struct {
	*httptest.Server
	resets    atomic.Int64
	hangs     atomic.Int64
	hangEnded chan time.Duration // how long each /hang was kept waiting
	streamed  atomic.Int64       // bytes /endless managed to write
	endless   chan struct{}      // closed-per-request: /endless gave up
	oks       atomic.Int64
}

func newFaultBackend(t *testing.T) *faultBackend {
	t.Helper()
	fb := &faultBackend{hangEnded: make(chan time.Duration, 16), endless: make(chan struct{}, 16)}
	fb.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		switch r.URL.Path {
		case "/reset":
			fb.resets.Add(1)
			conn, _, err := w.(http.Hijacker).Hijack()
			if err != nil {
				return
			}
			if tc, ok := conn.(*net.TCPConn); ok {
				_ = tc.SetLinger(0) // RST rather than FIN
			}
			conn.Close()
		case "/hang":
			fb.hangs.Add(1)
			start := time.Now()
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
			fb.hangEnded <- time.Since(start)
		case "/endless":
			// Gigabytes, unless the reader hangs up first.
			defer func() { fb.endless <- struct{}{} }()
			w.Header().Set("Content-Type", "application/octet-stream")
			chunk := bytes.Repeat([]byte{0xAB}, 64<<10)
			for fb.streamed.Load() < 4<<30 {
				n, err := w.Write(chunk)
				fb.streamed.Add(int64(n))
				if err != nil {
					return
				}
			}
		default:
			fb.oks.Add(1)
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"ok":true}`)
		}
	}))
	t.Cleanup(fb.Close)
	return fb
}

// garbageServer answers every request with bytes that are not HTTP.
func garbageServer(t *testing.T) (addr string, hits *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hits = new(atomic.Int64)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
				br := bufio.NewReader(conn)
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						return
					}
					if line == "\r\n" {
						break
					}
				}
				hits.Add(1)
				_, _ = conn.Write([]byte("SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02garbage, not HTTP\r\n\r\n"))
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String(), hits
}

// Test-only handlers that fail after writing part of an answer.
func init() {
	caddy.RegisterModule(writePanicHandler{})
	httpcaddyfile.RegisterHandlerDirective("test_write_panic", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		h.Next()
		abort := h.NextArg() && h.Val() == "abort"
		return writePanicHandler{Abort: abort}, nil
	})
}

// writePanicHandler writes a header and part of a body, then panics; with
// Abort, with http.ErrAbortHandler, as reverse_proxy does mid-stream.
type writePanicHandler struct {
	Abort bool `json:"abort,omitempty"`
}

func (writePanicHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.test_write_panic", New: func() caddy.Module { return new(writePanicHandler) }}
}

func (h writePanicHandler) ServeHTTP(w http.ResponseWriter, _ *http.Request, _ caddyhttp.Handler) error {
	w.Header().Set("Set-Cookie", "half=1")
	w.WriteHeader(http.StatusCreated)
	_, _ = io.WriteString(w, `{"partial":`)
	if h.Abort {
		panic(http.ErrAbortHandler)
	}
	panic(errors.New("boom after writing"))
}

// recorder is a backend that logs what it got and when, and answers with
// answer, or else 200 with what it got.
type recorder struct {
	*httptest.Server
	mu   sync.Mutex
	reqs []seen
}

func newRecorder(t *testing.T, answer func(w http.ResponseWriter, r *http.Request) bool) *recorder {
	t.Helper()
	rec := &recorder{}
	rec.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		rec.mu.Lock()
		rec.reqs = append(rec.reqs, seen{Method: r.Method, Path: r.URL.RequestURI(), Header: r.Header.Clone(), Body: body, At: time.Now()})
		rec.mu.Unlock()
		if answer != nil && answer(w, r) {
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "%s %s %s", r.Method, r.URL.RequestURI(), body)
	}))
	t.Cleanup(rec.Close)
	return rec
}

func (rec *recorder) requests() []seen {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([]seen(nil), rec.reqs...)
}

func (rec *recorder) addr() string { return rec.Listener.Addr().String() }

func (rec *recorder) reset() {
	rec.mu.Lock()
	rec.reqs = nil
	rec.mu.Unlock()
}

// restartableCaddy starts Caddy in front of be with jobs that any
// instance can resume (sealed credentials, lease 1s); restart starts it
// again on the same storage and port once it has been stopped.
func restartableCaddy(t *testing.T, be *backend) (base string, restart func() string) {
	t.Helper()
	storage := t.TempDir()
	port := freePort(t)
	cfgJSON := adapt(t, testCaddyfile(storage, port, "", proxySite(be, `{
		async {
			credentials_key `+testKey+`
			lease 1s
		}
	}`)))
	return loadCaddy(t, cfgJSON, port), func() string { return loadCaddy(t, cfgJSON, port) }
}

// testKey is a credentials_key for tests.
const testKey = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=" // base64 of 32 bytes
