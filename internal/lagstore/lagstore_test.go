package lagstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"github.com/tidwall/gjson"
)

// deadline bounds every wait of these tests for something that should
// happen at once: reaching it is a hang, not slowness.
const deadline = 10 * time.Second

// gate replaces sleep for a test: each wait is reported on waits and
// lasts until release receives, or its context ends.
type gate struct {
	waits   chan time.Duration
	release chan struct{}
}

func gated(t *testing.T) *gate {
	g := &gate{waits: make(chan time.Duration, 1), release: make(chan struct{})}
	old := sleep
	sleep = func(ctx context.Context, d time.Duration) error {
		g.waits <- d
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-g.release:
			return nil
		}
	}
	t.Cleanup(func() { sleep = old })
	return g
}

// waited is the next wait started.
func (g *gate) waited(t *testing.T) time.Duration {
	t.Helper()
	select {
	case d := <-g.waits:
		return d
	case <-time.After(deadline):
		t.Fatal("no call waited")
		return 0
	}
}

func newStore(t *testing.T, latency, jitter time.Duration) *store {
	t.Helper()
	cs, err := (&Storage{Root: t.TempDir(), Latency: caddy.Duration(latency), Jitter: caddy.Duration(jitter)}).CertMagicStorage()
	if err != nil {
		t.Fatal(err)
	}
	return cs.(*store)
}

// result waits for a call run in the background to return.
func result[T any](t *testing.T, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(deadline):
		t.Fatal("the call did not return")
		var zero T
		return zero
	}
}

func TestLagWaitsBeforeEveryCall(t *testing.T) {
	g := gated(t)
	const latency = 20 * time.Millisecond
	s := newStore(t, latency, 0)
	ctx := context.Background()

	// A store reaches the file system only once its wait is over.
	done := make(chan error, 1)
	go func() { done <- s.Store(ctx, "jobs/a", []byte("x")) }()
	if d := g.waited(t); d != latency {
		t.Fatalf("Store waited %s, want %s", d, latency)
	}
	if s.fs.Exists(ctx, "jobs/a") {
		t.Fatal("the key was stored before the wait ended")
	}
	select {
	case err := <-done:
		t.Fatalf("Store returned (%v) before its wait ended", err)
	default:
	}
	g.release <- struct{}{}
	if err := result(t, done); err != nil {
		t.Fatal(err)
	}
	if !s.fs.Exists(ctx, "jobs/a") {
		t.Fatal("the key was not stored after the wait")
	}

	// Every other call waits as long, then answers as the file system does.
	if err := s.fs.Store(ctx, "jobs/b", []byte("y")); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		call func() (string, error)
	}{
		{"Load", func() (string, error) { b, err := s.Load(ctx, "jobs/b"); return string(b), err }},
		{"Exists", func() (string, error) { return fmt.Sprint(s.Exists(ctx, "jobs/b")), nil }},
		{"List", func() (string, error) { k, err := s.List(ctx, "jobs", false); return strings.Join(k, ","), err }},
		{"Stat", func() (string, error) { i, err := s.Stat(ctx, "jobs/b"); return fmt.Sprint(i.Size), err }},
		{"Lock", func() (string, error) { return "", s.Lock(ctx, "l") }},
		{"Unlock", func() (string, error) { return "", s.Unlock(ctx, "l") }},
		{"Delete", func() (string, error) { return "", s.Delete(ctx, "jobs/b") }},
	} {
		type answer struct {
			v   string
			err error
		}
		done := make(chan answer, 1)
		go func() { v, err := c.call(); done <- answer{v, err} }()
		if d := g.waited(t); d != latency {
			t.Fatalf("%s waited %s, want %s", c.name, d, latency)
		}
		g.release <- struct{}{}
		a := result(t, done)
		want := map[string]string{"Load": "y", "Exists": "true", "List": "jobs/a,jobs/b", "Stat": "1"}[c.name]
		if a.err != nil || a.v != want {
			t.Fatalf("%s answered %q, %v; want %q", c.name, a.v, a.err, want)
		}
	}
	if s.fs.Exists(ctx, "jobs/b") {
		t.Fatal("Delete did not delete")
	}
}

func TestLagJitterAddsUpToItsBound(t *testing.T) {
	g := gated(t)
	const latency, jitter = 10 * time.Millisecond, 5 * time.Millisecond
	s := newStore(t, latency, jitter)
	seen := map[time.Duration]bool{}
	for range 50 {
		done := make(chan bool, 1)
		go func() { done <- s.Exists(context.Background(), "k") }()
		d := g.waited(t)
		if d < latency || d > latency+jitter {
			t.Fatalf("waited %s, want %s to %s", d, latency, latency+jitter)
		}
		seen[d] = true
		g.release <- struct{}{}
		result(t, done)
	}
	if len(seen) < 2 {
		t.Fatalf("50 waits all lasted %v: no jitter", seen)
	}
}

func TestLagCountsCallsByMethod(t *testing.T) {
	s := newStore(t, 0, 0) // no wait: the calls are still counted
	ctx := context.Background()
	before := Calls()
	_ = s.Store(ctx, "k", []byte("v"))
	_, _ = s.Load(ctx, "k")
	_, _ = s.Load(ctx, "k")
	_ = s.Exists(ctx, "k")
	_, _ = s.List(ctx, "", true)
	_, _ = s.Stat(ctx, "k")
	_ = s.Lock(ctx, "l")
	_ = s.Unlock(ctx, "l")
	_ = s.Delete(ctx, "k")
	got := Calls().Sub(before)
	want := Counts{Store: 1, Load: 2, Delete: 1, Exists: 1, List: 1, Stat: 1, Lock: 1, Unlock: 1}
	if got != want || got.Total() != 9 {
		t.Fatalf("counted %+v (total %d), want %+v (9)", got, got.Total(), want)
	}

	// The handler answers the process's counts.
	w := httptest.NewRecorder()
	if err := (CallsHandler{}).ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/calls", nil), nil); err != nil {
		t.Fatal(err)
	}
	now := Calls()
	body := w.Body.String()
	if w.Code != http.StatusOK || w.Header().Get("Content-Type") != "application/json" ||
		gjson.Get(body, "load").Int() != now.Load || gjson.Get(body, "unlock").Int() != now.Unlock ||
		gjson.Get(body, "total").Int() != now.Total() {
		t.Fatalf("handler answered %d %s, counts %+v", w.Code, body, now)
	}
}

func TestLagHonoursCancellation(t *testing.T) {
	g := gated(t)
	s := newStore(t, time.Hour, 0)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Store(ctx, "k", []byte("v")) }()
	g.waited(t)
	cancel()
	if err := result(t, done); !errors.Is(err, context.Canceled) {
		t.Fatalf("a Store canceled while it waits returned %v", err)
	}
	if s.fs.Exists(context.Background(), "k") {
		t.Fatal("a canceled Store stored its key")
	}

	// Calls that cannot return an error: a canceled Exists cannot tell.
	if err := s.fs.Store(context.Background(), "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	exists := make(chan bool, 1)
	go func() { exists <- s.Exists(ctx, "k") }()
	g.waited(t)
	if result(t, exists) {
		t.Fatal("a canceled Exists answered true")
	}
	// A canceled Lock takes no lock.
	locked := make(chan error, 1)
	go func() { locked <- s.Lock(ctx, "l") }()
	g.waited(t)
	if err := result(t, locked); !errors.Is(err, context.Canceled) {
		t.Fatalf("a canceled Lock returned %v", err)
	}
	if ok, err := s.fs.TryLock(context.Background(), "l"); err != nil || !ok {
		t.Fatalf("the lock is held after a canceled Lock: %v %v", ok, err)
	}
	_ = s.fs.Unlock(context.Background(), "l")
}

// The real wait, not the tests' gate, ends with its context.
func TestLagWaitEndsWithContext(t *testing.T) {
	s := newStore(t, time.Hour, 0)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := s.Load(ctx, "k"); done <- err }()
	cancel()
	if err := result(t, done); !errors.Is(err, context.Canceled) {
		t.Fatalf("Load returned %v", err)
	}
}

func TestLagCaddyfile(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Storage // zero: an error
	}{
		{"batch_lag /s", Storage{Root: "/s"}},
		{"batch_lag /s {\n latency 2ms\n jitter 500us\n}", Storage{Root: "/s", Latency: caddy.Duration(2 * time.Millisecond), Jitter: caddy.Duration(500 * time.Microsecond)}},
		{"batch_lag {\n root /s\n latency 20ms\n}", Storage{Root: "/s", Latency: caddy.Duration(20 * time.Millisecond)}},
		{"batch_lag", Storage{}},
		{"batch_lag /s /t", Storage{}},
		{"batch_lag /s {\n root /t\n}", Storage{}},
		{"batch_lag /s {\n latency\n}", Storage{}},
		{"batch_lag /s {\n latency soon\n}", Storage{}},
		{"batch_lag /s {\n latency -1s\n}", Storage{}},
		{"batch_lag /s {\n jitter 1ms 2ms\n}", Storage{}},
		{"batch_lag /s {\n bandwidth 1\n}", Storage{}},
	} {
		var s Storage
		err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser(c.in))
		if c.want == (Storage{}) {
			if err == nil {
				t.Errorf("%q: no error, got %+v", c.in, s)
			}
			continue
		}
		if err != nil || s != c.want {
			t.Errorf("%q: got %+v, %v; want %+v", c.in, s, err, c.want)
		}
	}
	for in, ok := range map[string]bool{
		"batch_storage_calls":           true,
		"batch_storage_calls extra":     false,
		"batch_storage_calls {\n x\n}":  false,
		"batch_storage_calls {\n}\n":    true,
		"batch_storage_calls { x }\n\n": false,
	} {
		err := new(CallsHandler).UnmarshalCaddyfile(caddyfile.NewTestDispenser(in))
		if (err == nil) != ok {
			t.Errorf("%q: error %v", in, err)
		}
	}
}

// As the bench runs them: a Caddyfile with the storage and the handler,
// loaded by Caddy; what goes through Caddy's storage is counted, and the
// handler answers the counts.
func TestLagInCaddy(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	cfg := fmt.Sprintf(`{
	admin off
	auto_https off
	persist_config off
	storage batch_lag %s {
		latency 1ms
	}
	log {
		level ERROR
	}
}
http://127.0.0.1:%d {
	batch_storage_calls /calls
	respond "other" 200
}`, t.TempDir(), port)
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
	if err != nil {
		t.Fatal(err)
	}
	if m, l := gjson.GetBytes(cfgJSON, "storage.module").String(), gjson.GetBytes(cfgJSON, "storage.latency").Int(); m != "batch_lag" || l != int64(time.Millisecond) {
		t.Fatalf("storage adapted to %s", gjson.GetBytes(cfgJSON, "storage").Raw)
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	if _, ok := caddy.ActiveContext().Storage().(*store); !ok {
		t.Fatalf("Caddy's storage is %T", caddy.ActiveContext().Storage())
	}
	get := func(path string) string {
		t.Helper()
		client := &http.Client{Timeout: deadline}
		for i := 0; ; i++ {
			resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, path))
			if err == nil {
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != http.StatusOK {
					t.Fatalf("GET %s: %d %v", path, resp.StatusCode, err)
				}
				return string(b)
			}
			if i == 100 {
				t.Fatalf("GET %s: %v", path, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	before := gjson.Get(get("/calls"), "store").Int()
	if err := caddy.ActiveContext().Storage().Store(context.Background(), "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	// Caddy stores keys of its own in the background (its instance id,
	// the time it last cleaned storage): at least ours is counted.
	if after := gjson.Get(get("/calls"), "store").Int(); after < before+1 {
		t.Fatalf("stores counted went from %d to %d over one Store", before, after)
	}
	if got := get("/other"); got != "other" {
		t.Fatalf("another path answered %q: the handler must stay on its own", got)
	}
}
