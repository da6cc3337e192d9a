package batch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestIdempotencyKey(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	batch := `[{"method":"POST","path":"/users","body":{"name":"Once"}}]`

	status, _, first := send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: k1")
	if status != 200 {
		t.Fatalf("%d %s", status, first)
	}
	status, hdr, again := send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: k1")
	if status != 200 || again != first || hdr.Get("Idempotent-Replayed") != "true" {
		t.Errorf("replay: %d %q %s, want %s", status, hdr.Get("Idempotent-Replayed"), again, first)
	}
	if be.API.Len() != 1 {
		t.Errorf("the batch ran %d times", be.API.Len())
	}
	status, _, body := send(t, "POST", base+"/batch", `[{"method":"POST","path":"/users","body":{"name":"Other"}}]`, alice, "Idempotency-Key: k1")
	if status != 422 {
		t.Errorf("same key, other body: %d %s", status, body)
	}
	// Keys belong to their owner.
	if status, hdr, _ := send(t, "POST", base+"/batch", batch, "Authorization: Bearer bob", "Idempotency-Key: k1"); status != 200 || hdr.Get("Idempotent-Replayed") != "" {
		t.Errorf("another owner's key: %d replayed %q", status, hdr.Get("Idempotent-Replayed"))
	}
	if be.API.Len() != 2 {
		t.Errorf("backend holds %d users, want 2", be.API.Len())
	}

	// Async: the repeat gets the same job.
	status, hdr1, body1 := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, alice, "Prefer: respond-async", "Idempotency-Key: k2")
	status2, hdr2, body2 := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, alice, "Prefer: respond-async", "Idempotency-Key: k2")
	id := mustJSON(t, body1).Get("id").String()
	if status != 202 || status2 != 202 || mustJSON(t, body2).Get("id").String() != id || hdr1.Get("Location") != hdr2.Get("Location") || hdr2.Get("Location") == "" {
		t.Errorf("async replay: %d %s / %d %s", status, body1, status2, body2)
	}
	waitJob(t, base+"/batch/"+id, alice, "completed")
}

// Twenty identical submissions at once run the batch once.
func TestIdempotencyConcurrent(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	var wg sync.WaitGroup
	bodies := make([]string, 20)
	statuses := make([]int, 20)
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			statuses[i], _, bodies[i] = send(t, "POST", base+"/batch", `[{"method":"POST","path":"/users","body":{"name":"Dup"}},{"path":"/slow?d=50ms"}]`, alice, "Idempotency-Key: same")
		}()
	}
	waitGroup(t, 40*time.Second, "the twenty submissions to be answered", &wg)
	for i := range 20 {
		if statuses[i] != 200 || bodies[i] != bodies[0] {
			t.Errorf("submission %d: %d %s, want %s", i, statuses[i], bodies[i], bodies[0])
		}
	}
	if be.API.Len() != 1 {
		t.Errorf("20 submissions with one key created %d users", be.API.Len())
	}
}

// Keys hold across instances sharing storage.
func TestIdempotencyAcrossInstances(t *testing.T) {
	be := newBackend(t)
	a, b, _ := twoCaddies(t, t.TempDir(), "batch /batch\nreverse_proxy "+be.addr())
	batch := `[{"method":"POST","path":"/users","body":{"name":"Across"}}]`
	_, _, first := send(t, "POST", a+"/batch", batch, alice, "Idempotency-Key: x")
	status, hdr, again := send(t, "POST", b+"/batch", batch, alice, "Idempotency-Key: x")
	if status != 200 || again != first || hdr.Get("Idempotent-Replayed") != "true" || be.API.Len() != 1 {
		t.Errorf("replay on the other instance: %d %s (users %d)", status, again, be.API.Len())
	}
}

// skewClock makes now() run ahead by what the returned func is given. Call
// it before starting Caddy: its cleanup then puts the clock back after
// Caddy stopped, so that no goroutine reads now while it is replaced.
func skewClock(t *testing.T) (ahead func(time.Duration)) {
	t.Helper()
	var skew atomic.Int64
	now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	t.Cleanup(func() { now = time.Now })
	return func(d time.Duration) { skew.Store(int64(d)) }
}

// answerFiles lists the idempotent answers a file_system storage holds.
func answerFiles(t *testing.T, storage string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(storage, "batch", "idempotency"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	var files []string
	for _, e := range entries {
		if !e.IsDir() {
			files = append(files, filepath.Join(storage, "batch", "idempotency", e.Name()))
		}
	}
	return files
}

// Answers kept for an Idempotency-Key are deleted once expired, by a
// handler without an async block too (retention 24h): a config sweeps
// when it starts. The key then runs its batch again.
func TestIdempotentAnswersExpire(t *testing.T) {
	ahead := skewClock(t)
	be := newBackend(t)
	storage := t.TempDir()
	site := proxySite(be, "")
	base := startCaddy(t, site, inStorage(storage))
	batch := `[{"method":"POST","path":"/users","body":{"name":"Kept"}}]`
	if status, _, body := send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: old"); status != 200 {
		t.Fatalf("%d %s", status, body)
	}
	ahead(23 * time.Hour)
	if status, _, body := send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: young"); status != 200 {
		t.Fatalf("%d %s", status, body)
	}
	if n := len(answerFiles(t, storage)); n != 2 {
		t.Fatalf("%d answers stored, want 2", n)
	}

	ahead(25 * time.Hour) // "old" expired an hour ago; "young" has 22 hours left
	base = startCaddy(t, site, inStorage(storage))
	eventually(t, 10*time.Second, "the expired answer to be swept", func() bool { return len(answerFiles(t, storage)) == 1 })
	if _, hdr, _ := send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: young"); hdr.Get("Idempotent-Replayed") != "true" {
		t.Error("the answer that has not expired is gone")
	}
	if _, hdr, _ := send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: old"); hdr.Get("Idempotent-Replayed") != "" || be.API.Len() != 3 {
		t.Errorf("an expired key replayed (%q), or did not run (%d users)", hdr.Get("Idempotent-Replayed"), be.API.Len())
	}
}

// The sweep also comes back while the config runs.
func TestIdempotentAnswersSweptPeriodically(t *testing.T) {
	ahead := skewClock(t)
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, proxySite(be, "{\n\t\tasync {\n\t\t\tretention 1s\n\t\t}\n\t}"), inStorage(storage))
	if status, _, body := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, alice, "Idempotency-Key: k"); status != 200 {
		t.Fatalf("%d %s", status, body)
	}
	if n := len(answerFiles(t, storage)); n != 1 {
		t.Fatalf("%d answers stored, want 1", n)
	}
	ahead(2 * time.Second)
	eventually(t, 10*time.Second, "the expired answer to be swept", func() bool { return len(answerFiles(t, storage)) == 0 })
}

// An answer larger than max_idempotent_size (default 1 MiB) is sent, whole,
// but not kept: the client is told, and the key runs the batch again.
// One within it is kept before it is sent, with its Content-Length.
func TestIdempotentAnswerTooLargeIsNotStored(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, proxySite(be, ""), inStorage(storage))
	big := `[{"path":"/big?n=600000"},{"path":"/big?n=600000"}]`
	for i := range 2 {
		status, hdr, body := send(t, "POST", base+"/batch", big, alice, "Idempotency-Key: big")
		res := mustJSON(t, body).Array()
		if status != 200 || len(res) != 2 || res[1].Get("status").Int() != 200 || len(res[1].Get("body").String()) != 600000 {
			t.Fatalf("answer %d: %d, %d results, %d bytes", i, status, len(res), len(body))
		}
		if hdr.Get("Idempotent-Stored") != "false" || hdr.Get("Idempotent-Replayed") != "" {
			t.Errorf("answer %d: Idempotent-Stored %q, Idempotent-Replayed %q", i, hdr.Get("Idempotent-Stored"), hdr.Get("Idempotent-Replayed"))
		}
	}
	if n := len(answerFiles(t, storage)); n != 0 {
		t.Errorf("%d answers stored", n)
	}
	bigs := 0
	for _, r := range be.requests() {
		if strings.HasPrefix(r.Path, "/big") {
			bigs++
		}
	}
	if bigs != 4 {
		t.Errorf("the backend was asked %d times for /big, want 4", bigs)
	}

	status, hdr, first := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, alice, "Idempotency-Key: small")
	if status != 200 || hdr.Get("Idempotent-Stored") != "true" || hdr.Get("Content-Length") != strconv.Itoa(len(first)) {
		t.Errorf("small answer: %d, Idempotent-Stored %q, Content-Length %q of %d bytes", status, hdr.Get("Idempotent-Stored"), hdr.Get("Content-Length"), len(first))
	}
	if _, hdr, again := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, alice, "Idempotency-Key: small"); again != first || hdr.Get("Idempotent-Replayed") != "true" {
		t.Errorf("replay: %q %s, want %s", hdr.Get("Idempotent-Replayed"), again, first)
	}

	// The bound is configured.
	base = startCaddy(t, proxySite(be, "{\n\t\tmax_idempotent_size 16KiB\n\t}"), inStorage(storage))
	if _, hdr, _ := send(t, "POST", base+"/batch", `[{"path":"/big?n=20000"}]`, alice, "Idempotency-Key: mid"); hdr.Get("Idempotent-Stored") != "false" {
		t.Errorf("20 kB answer over a 16 KiB bound: Idempotent-Stored %q", hdr.Get("Idempotent-Stored"))
	}
}

// The copy kept of an idempotent answer never exceeds the bound: a batch
// with an 18 MB answer holds about what one without a key holds.
func TestIdempotentAnswerMemoryBounded(t *testing.T) {
	const (
		ops     = 20
		maxResp = 1_000_000
	)
	be := newBackend(t)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		max_response_size 1MB
	}
	route {
		test_heap_probe
		reverse_proxy %s
	}`, be.addr()))
	send := func(key string, n int) {
		t.Helper()
		batch := "[" + strings.TrimSuffix(strings.Repeat(`{"path":"/big?n=900000"},`, n), ",") + "]"
		resp, err := client.Do(request(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: "+key))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		c := &resultCounter{} // counts the answer without keeping it
		if _, err := io.Copy(c, resp.Body); err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 200 || c.results != n || c.succeeded != n {
			t.Fatalf("status %d, %d results, %d succeeded", resp.StatusCode, c.results, c.succeeded)
		}
	}
	send("warm-up", 1)

	before := liveHeap()
	heapProbe.Lock()
	heapProbe.on, heapProbe.samples = true, nil
	heapProbe.Unlock()
	send("big", ops)
	heapProbe.Lock()
	heapProbe.on = false
	samples := heapProbe.samples
	heapProbe.Unlock()
	if len(samples) != ops {
		t.Fatalf("%d samples, want %d", len(samples), ops)
	}
	var peak int64
	for _, s := range samples {
		peak = max(peak, int64(s)-int64(before))
	}
	t.Logf("live heap before %.1f MB; with an answer captured +%.1f MB at most", float64(before)/1e6, float64(peak)/1e6)
	// TestSequentialBatchMemoryBounded's 7x for a batch without a key, plus
	// the bound (1 MiB) and its growth. Keeping the whole answer would end
	// 17 MB up.
	if limit := int64(7*maxResp + 2<<20); peak > limit {
		t.Errorf("the live heap grew up to %.1f MB; bound %.1f MB", float64(peak)/1e6, float64(limit)/1e6)
	}
}

// A batch that did not run to its end is not kept: the client that left
// mid-batch, or one whose batch timed out, runs it whole on its retry.
func TestIdempotencyCutBatchIsNotStored(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	batch := `[{"method":"POST","path":"/users","body":{"name":"Cut"}},{"path":"/slow?d=300ms&id=cut"},{"path":"/health"},{"path":"/health"}]`
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	req := request(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: cut").WithContext(ctx)
	go func() {
		defer close(done)
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	eventually(t, 10*time.Second, "the slow operation to start", func() bool { return slices.Contains(be.eventLog(), "start cut") })
	cancel()
	receive(t, 10*time.Second, "the client that left to return", done)

	// The retry waits for the batch it cut off to end.
	status, hdr, first := send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: cut")
	if status != 200 || hdr.Get("Idempotent-Replayed") != "" || hdr.Get("Idempotent-Stored") != "true" {
		t.Fatalf("retry: %d, Idempotent-Replayed %q, Idempotent-Stored %q: %s", status, hdr.Get("Idempotent-Replayed"), hdr.Get("Idempotent-Stored"), first)
	}
	for i, r := range mustJSON(t, first).Array() {
		if r.Get("status").Int() >= 300 {
			t.Errorf("retry: result %d: %s", i, r.Raw)
		}
	}
	if _, hdr, again := send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: cut"); again != first || hdr.Get("Idempotent-Replayed") != "true" {
		t.Errorf("the whole answer is not the one kept: %q %s", hdr.Get("Idempotent-Replayed"), again)
	}

	base = startCaddy(t, proxySite(be, "{\n\t\ttimeout 100ms\n\t}"))
	for i := range 2 {
		status, hdr, body := send(t, "POST", base+"/batch", `[{"path":"/slow?d=2s"}]`, alice, "Idempotency-Key: late")
		if status != 200 || mustJSON(t, body).Get("0.status").Int() != 504 || hdr.Get("Idempotent-Stored") != "false" || hdr.Get("Idempotent-Replayed") != "" {
			t.Errorf("timed out batch, try %d: %d, Idempotent-Stored %q, Idempotent-Replayed %q: %s", i, status, hdr.Get("Idempotent-Stored"), hdr.Get("Idempotent-Replayed"), body)
		}
	}
}

// A replay repeats the headers of the answer it replays: an NDJSON answer
// stays NDJSON; an async one keeps its Location and Preference-Applied.
func TestIdempotentReplayKeepsHeaders(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	batch := `[{"path":"/health"},{"path":"/health"}]`
	_, hdr, first := send(t, "POST", base+"/batch", batch, alice, "Accept: application/x-ndjson", "Idempotency-Key: nd")
	if hdr.Get("Content-Type") != "application/x-ndjson" || strings.Count(first, "\n") != 3 {
		t.Fatalf("first answer: %q %s", hdr.Get("Content-Type"), first)
	}
	_, hdr, again := send(t, "POST", base+"/batch", batch, alice, "Accept: application/x-ndjson", "Idempotency-Key: nd")
	if hdr.Get("Content-Type") != "application/x-ndjson" || again != first || hdr.Get("Idempotent-Replayed") != "true" {
		t.Errorf("replay: %q %q %s, want %s", hdr.Get("Content-Type"), hdr.Get("Idempotent-Replayed"), again, first)
	}

	var locations []string
	for range 2 {
		status, hdr, body := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, alice, "Prefer: respond-async", "Idempotency-Key: as")
		if status != 202 || hdr.Get("Preference-Applied") != "respond-async" || hdr.Get("Content-Type") != "application/json" {
			t.Errorf("async: %d, Preference-Applied %q, Content-Type %q: %s", status, hdr.Get("Preference-Applied"), hdr.Get("Content-Type"), body)
		}
		locations = append(locations, hdr.Get("Location"))
	}
	if locations[0] == "" || locations[1] != locations[0] {
		t.Errorf("Location %q, then %q", locations[0], locations[1])
	}
	waitJob(t, base+locations[0], alice, "completed")
}

// A record that cannot be read, or replayed, does not lock its key out
// for good: the batch runs again and its answer replaces the record.
func TestIdempotentRecordUndecodable(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, proxySite(be, ""), inStorage(storage))
	batch := `[{"method":"POST","path":"/users","body":{"name":"Again"}}]`
	send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: k")
	files := answerFiles(t, storage)
	if len(files) != 1 {
		t.Fatalf("%d answers stored", len(files))
	}
	sum := sha256.Sum256([]byte(batch))
	for i, broken := range []string{
		`{"body_hash":`,
		`{"body_hash":"` + hex.EncodeToString(sum[:]) + `","status":0,"expires_at":"2999-01-01T00:00:00Z"}` + "\n",
	} {
		if err := os.WriteFile(files[0], []byte(broken), 0o600); err != nil {
			t.Fatal(err)
		}
		status, hdr, first := send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: k")
		if status != 200 || hdr.Get("Idempotent-Replayed") != "" || be.API.Len() != i+2 {
			t.Fatalf("over %s: %d %q (%d users): %s", broken, status, hdr.Get("Idempotent-Replayed"), be.API.Len(), first)
		}
		if _, hdr, again := send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: k"); again != first || hdr.Get("Idempotent-Replayed") != "true" {
			t.Errorf("replay: %q %s, want %s", hdr.Get("Idempotent-Replayed"), again, first)
		}
	}
}

// A client that stops reading an answer too large to keep does not hold
// the key: once the answer outgrows the bound, the key is released.
func TestIdempotencyStalledReaderReleasesKey(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	// 8 MB: more than the kernel buffers for a reader that takes nothing.
	batch := "[" + strings.TrimSuffix(strings.Repeat(`{"path":"/big?n=1000000"},`, 8), ",") + "]"
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() }) // before Caddy stops: it waits for the answer
	_ = conn.(*net.TCPConn).SetReadBuffer(4096)
	fmt.Fprintf(conn, "POST /batch HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nAuthorization: Bearer alice\r\n"+
		"Idempotency-Key: stall\r\nContent-Length: %d\r\n\r\n%s", strings.TrimPrefix(base, "http://"), len(batch), batch)
	eventually(t, 10*time.Second, "the first batch to run", func() bool { return len(be.requests()) > 0 })

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := client.Do(request(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: stall").WithContext(ctx))
	if err != nil {
		t.Fatalf("the same key, while the first client reads nothing: %v", err)
	}
	defer resp.Body.Close()
	c := &resultCounter{}
	if _, err := io.Copy(c, resp.Body); err != nil {
		t.Fatalf("the same key, while the first client reads nothing: %v", err)
	}
	if resp.StatusCode != 200 || c.succeeded != 8 || resp.Header.Get("Idempotent-Stored") != "false" {
		t.Errorf("%d, %d succeeded, Idempotent-Stored %q", resp.StatusCode, c.succeeded, resp.Header.Get("Idempotent-Stored"))
	}
}

// Clients waiting for a key that leave stop waiting: they hold nothing
// while the batch with the key runs on.
func TestIdempotencyWaitersLeave(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	batch := `[{"path":"/slow?d=10s&id=hold"}]`
	send := func(ctx context.Context, c *http.Client) {
		if resp, err := c.Do(request(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: hold").WithContext(ctx)); err == nil {
			resp.Body.Close()
		}
	}
	holder, stopHolder := context.WithCancel(context.Background())
	held := make(chan struct{})
	go func() { defer close(held); send(holder, client) }()
	t.Cleanup(func() { stopHolder(); receive(t, 10*time.Second, "the client holding the key to return", held) })
	eventually(t, 10*time.Second, "the batch to start", func() bool { return slices.Contains(be.eventLog(), "start hold") })

	const waiters = 20
	base0 := runtime.NumGoroutine()
	ctx, leave := context.WithCancel(context.Background())
	oneShot := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	var wg sync.WaitGroup
	for range waiters {
		wg.Go(func() { send(ctx, oneShot) })
	}
	// Each waiter is 5 goroutines: its client's request, read and write
	// loops, and the server's connection and background read, which starts
	// once the handler has read the body.
	eventually(t, 10*time.Second, "the waiters to arrive", func() bool { return runtime.NumGoroutine() >= base0+5*waiters-5 })
	leave()
	waitGroup(t, 10*time.Second, "the waiters to return", &wg)
	eventually(t, 10*time.Second, "the waiters to be gone", func() bool {
		if slices.Contains(be.eventLog(), "end hold") {
			t.Fatal("the waiters were held until the batch with the key ended")
		}
		return runtime.NumGoroutine() <= base0+waiters/4
	})
}

// max_idempotent_size takes a size, like the other bounds, and must be
// positive in JSON too.
func TestMaxIdempotentSizeConfig(t *testing.T) {
	t.Parallel()
	for input, want := range map[string]int64{"64KiB": 64 << 10, "2MB": 2_000_000, "4096": 4096} {
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("batch {\n max_idempotent_size " + input + "\n}")); err != nil || h.MaxIdempotentSize != want {
			t.Errorf("max_idempotent_size %s: %d, %v; want %d", input, h.MaxIdempotentSize, err, want)
		}
	}
	for _, bad := range []string{"max_idempotent_size", "max_idempotent_size 0", "max_idempotent_size lots", "max_idempotent_size 1MB 2MB",
		"max_idempotent_size 1MB\n max_idempotent_size 2MB"} {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("batch {\n " + bad + "\n}"))
		if err == nil || !strings.Contains(err.Error(), "Testfile:") {
			t.Errorf("%q: %v, want an error with its line", bad, err)
		}
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	h := Handler{MaxIdempotentSize: -1}
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	if h.Validate() == nil {
		t.Error("max_idempotent_size -1 accepted")
	}
	h = Handler{}
	if err := h.Provision(ctx); err != nil || h.MaxIdempotentSize != 1<<20 {
		t.Errorf("default %d, %v", h.MaxIdempotentSize, err)
	}
}

// Records written before headers were kept still replay.
func TestIdempotentReplaysEarlierRecords(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, proxySite(be, ""), inStorage(storage))
	batch := `[{"path":"/health"}]`
	send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: k")
	files := answerFiles(t, storage)
	if len(files) != 1 {
		t.Fatalf("%d answers stored", len(files))
	}
	sum := sha256.Sum256([]byte(batch))
	old, _ := json.Marshal(map[string]any{"body_hash": hex.EncodeToString(sum[:]), "status": 200,
		"body": []byte(`[{"id":"0","status":200}]`), "expires_at": time.Now().Add(time.Hour)})
	if err := os.WriteFile(files[0], old, 0o600); err != nil {
		t.Fatal(err)
	}
	_, hdr, body := send(t, "POST", base+"/batch", batch, alice, "Idempotency-Key: k")
	if body != `[{"id":"0","status":200}]` || hdr.Get("Content-Type") != "application/json" || hdr.Get("Idempotent-Replayed") != "true" {
		t.Errorf("earlier record: %q %q %s", hdr.Get("Content-Type"), hdr.Get("Idempotent-Replayed"), body)
	}
}
