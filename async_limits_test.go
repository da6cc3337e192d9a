package batch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
	"github.com/tidwall/gjson"
)

// Tests of issue #12 for async batches: what a client, a backend or a
// failing storage can make a job hold, and for how long.

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

func (s flakyStore) Store(ctx context.Context, key string, value []byte) error {
	if flakyBroken.Load() {
		return errFlaky
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

// startFlakyCaddy is startCaddyIn on test_flaky storage.
func startFlakyCaddy(t *testing.T, storage, site string) string {
	t.Helper()
	port := freePort(t)
	cfg := strings.Replace(testCaddyfile(storage, port, "", site), "storage file_system", "storage test_flaky", 1)
	return loadCaddy(t, adapt(t, cfg), port)
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
	status, _, resp := post(t, url, body, alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("submit: %d %s", status, resp)
	}
	return mustJSON(t, resp).Get("id").String()
}

// A job's results wait in memory until about 1 MiB, not until 100 of
// them: 40 answers of 1 MB do not make a job hold 40 MB, and readers of
// its results hold one stored part each, not a chunk of 100.
func TestAsyncResultsFlushedBySize(t *testing.T) {
	const n, size = 40, 1_000_000
	payload := bytes.Repeat([]byte("x"), size-1000) // headers count too
	var (
		mu      sync.Mutex
		on      bool
		between []uint64 // live heap as each operation reaches the backend
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		if on {
			between = append(between, liveHeap())
		}
		mu.Unlock()
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write(payload)
	}))
	t.Cleanup(srv.Close)
	storage := t.TempDir()
	base := startCaddyIn(t, storage, fmt.Sprintf(`
	batch /batch /batch/* {
		max_response_size 1MB
		async {
			workers 1
		}
	}
	reverse_proxy %s`, srv.Listener.Addr()))

	ops := "[" + strings.TrimSuffix(strings.Repeat(`{"path":"/blob"},`, n), ",") + "]"
	waitJob(t, base+"/batch/"+submitJob(t, base+"/batch", `[{"path":"/blob"}]`), alice, "completed") // warm-up
	before := liveHeap()
	mu.Lock()
	on = true
	mu.Unlock()
	id := submitJob(t, base+"/batch", ops)
	p := waitJob(t, base+"/batch/"+id, alice, "completed")
	mu.Lock()
	on = false
	samples := between
	mu.Unlock()
	if p.Get("succeeded").Int() != n || len(samples) != n {
		t.Fatalf("job %s, %d samples", p.Raw, len(samples))
	}
	var peak int64
	for _, s := range samples {
		peak = max(peak, int64(s)-int64(before))
	}
	t.Logf("job of %d answers of %d bytes: live heap grew at most %.1f MiB", n, size, float64(peak)/(1<<20))
	// One part (≤ 1 MiB plus one result), the answer being captured and
	// its encoding: a few MB. Buffering 100 results would hold all 40.
	if peak > 16<<20 {
		t.Errorf("live heap grew %d MiB while the job ran", peak>>20)
	}

	// Stored parts are bounded, and a page may start inside any part.
	var largest int64
	_ = filepath.WalkDir(filepath.Join(storage, "batch", "jobs", id, "results"), func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil {
				largest = max(largest, fi.Size())
			}
		}
		return nil
	})
	if largest == 0 || largest > 1<<20+size+1000 {
		t.Errorf("largest stored part: %d bytes", largest)
	}
	_, _, body := get(t, base+"/batch/"+id+"/results?offset=17&limit=3", alice)
	page := mustJSON(t, body).Get("results").Array()
	if len(page) != 3 || page[0].Get("id").String() != "17" || page[2].Get("id").String() != "19" {
		t.Errorf("page 17+3: %.200s", body)
	}

	// Four readers each read half of the results, then stop reading: the
	// handlers serving them hold what they have loaded.
	const readers = 4
	before = liveHeap()
	var read, done sync.WaitGroup
	release := make(chan struct{})
	counts := make([]*resultCounter, readers)
	for i := range readers {
		read.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			req, _ := http.NewRequest(http.MethodGet, base+"/batch/"+id+"/results", nil)
			req.Header.Set("Authorization", "Bearer alice")
			resp, err := client.Do(req)
			if err != nil {
				read.Done()
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			c := &resultCounter{}
			counts[i] = c
			_, err = io.CopyN(c, resp.Body, n*size/2)
			read.Done()
			if err != nil {
				t.Error(err)
				return
			}
			<-release
			_, _ = io.Copy(c, resp.Body)
		}()
	}
	read.Wait()
	var held int64
	for range 3 {
		held = max(held, int64(liveHeap())-int64(before))
		time.Sleep(20 * time.Millisecond)
	}
	close(release)
	done.Wait()
	t.Logf("%d readers paused halfway: live heap grew %.1f MiB", readers, float64(held)/(1<<20))
	if held > 24<<20 {
		t.Errorf("%d paused readers hold %d MiB", readers, held>>20)
	}
	for i, c := range counts {
		if c != nil && (c.results != n || c.last != '}') {
			t.Errorf("reader %d: %d results, %d bytes", i, c.results, c.n)
		}
	}
}

// Results stored as one part per chunk (as before parts existed) still
// read, whole and paged.
func TestAsyncResultsOfSinglePartChunks(t *testing.T) {
	storage := t.TempDir()
	id := "0123456789abcdef0123456789abcdef"
	sum := sha256.Sum256([]byte("caddy-batch owner\x00Bearer alice"))
	created := time.Now()
	rec, _ := json.Marshal(jobRecord{
		progress: progress{ID: id, Status: jobCompleted, Total: 150, Completed: 150, Succeeded: 150,
			CreatedAt: created, CompletedAt: &created},
		Outcome: "completed", Owner: hex.EncodeToString(sum[:]), ExpiresAt: created.Add(time.Hour),
	})
	chunk := func(from, to int) []byte {
		var items []string
		for i := from; i < to; i++ {
			items = append(items, fmt.Sprintf(`{"id":"%d","status":200,"body":{"n":[%d,"a,b]"]}}`, i, i))
		}
		return []byte(strings.Join(items, ","))
	}
	fsys := &certmagic.FileStorage{Path: storage}
	for k, v := range map[string][]byte{
		jobKey(id, "job"):               rec,
		jobKey(id, "results", "000000"): chunk(0, 100),
		jobKey(id, "results", "000001"): chunk(100, 150),
	} {
		if err := fsys.Store(context.Background(), k, v); err != nil {
			t.Fatal(err)
		}
	}
	base := startCaddyIn(t, storage, "batch /batch /batch/* {\n\tasync\n}\nrespond 404")
	_, _, body := get(t, base+"/batch/"+id+"/results", alice)
	all := mustJSON(t, body).Get("results").Array()
	if len(all) != 150 || all[149].Get("id").String() != "149" || all[99].Get("body.n.1").String() != "a,b]" {
		t.Fatalf("results: %d, %.300s", len(all), body)
	}
	_, _, body = get(t, base+"/batch/"+id+"/results?offset=98&limit=4", alice)
	page := mustJSON(t, body).Get("results").Array()
	if len(page) != 4 || page[0].Get("id").String() != "98" || page[3].Get("id").String() != "101" {
		t.Errorf("page 98+4: %s", body)
	}
}

// Pages across chunk and part boundaries of a job whose answers are of
// mixed sizes read the same results as the whole.
func TestAsyncResultsPagesAcrossParts(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	var ops []string
	for i := range 230 {
		if i%10 == 3 {
			ops = append(ops, fmt.Sprintf(`{"id":"o%d","path":"/big?n=400000"}`, i))
		} else {
			ops = append(ops, fmt.Sprintf(`{"id":"o%d","path":"/health"}`, i))
		}
	}
	id := submitJob(t, base+"/batch", "["+strings.Join(ops, ",")+"]")
	waitJob(t, base+"/batch/"+id, alice, "completed")
	_, _, body := get(t, base+"/batch/"+id+"/results", alice)
	all := mustJSON(t, body).Get("results").Array()
	if len(all) != 230 {
		t.Fatalf("%d results", len(all))
	}
	for _, off := range []int{0, 2, 3, 4, 95, 99, 100, 101, 197, 225, 229, 230, 500} {
		_, _, body := get(t, fmt.Sprintf("%s/batch/%s/results?offset=%d&limit=7", base, id, off), alice)
		page := mustJSON(t, body).Get("results").Array()
		if want := max(0, min(7, 230-off)); len(page) != want {
			t.Fatalf("offset %d: %d results, want %d", off, len(page), want)
		}
		for k, r := range page {
			if r.Raw != all[off+k].Raw {
				t.Fatalf("offset %d, result %d: %.100s, want %.100s", off, k, r.Raw, all[off+k].Raw)
			}
		}
	}
}

// Past max_queued, a job is refused with 503 and Retry-After before
// anything is stored, and refused jobs cost no memory.
func TestAsyncQueueBounded(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddyIn(t, storage, asyncSite(be, "max_queued 3"))
	for i := range 2 { // both workers busy
		submitJob(t, base+"/batch", fmt.Sprintf(`[{"path":"/slow?d=20s&id=block%d"}]`, i))
	}
	eventually(t, 10*time.Second, "both blockers running", func() bool {
		b := be.eventLog()
		return len(b) >= 2
	})

	// ~1 MB each: 1000 operations with bodies of 1 KB.
	var ops []string
	for i := range 1000 {
		ops = append(ops, fmt.Sprintf(`{"method":"POST","path":"/echo","body":{"n":%d,"pad":"%s"}}`, i, strings.Repeat("p", 1000)))
	}
	job := "[" + strings.Join(ops, ",") + "]"
	before := liveHeap()
	accepted, refused := 0, 0
	for range 30 {
		status, hdr, body := post(t, base+"/batch", job, alice, "Prefer: respond-async")
		switch status {
		case 202:
			accepted++
		case 503:
			refused++
			if hdr.Get("Retry-After") == "" || !strings.Contains(mustJSON(t, body).Get("error").String(), "queue") {
				t.Errorf("refusal: %v %s", hdr, body)
			}
		default:
			t.Fatalf("submit: %d %s", status, body)
		}
	}
	growth := int64(liveHeap()) - int64(before)
	t.Logf("30 jobs of %d bytes sent, %d queued: live heap grew %.1f MiB", len(job), accepted, float64(growth)/(1<<20))
	if accepted != 3 || refused != 27 {
		t.Errorf("accepted %d, refused %d; want 3 and 27", accepted, refused)
	}
	if growth > 20<<20 {
		t.Errorf("live heap grew %d MiB with 3 jobs queued", growth>>20)
	}
	dirs, _ := os.ReadDir(filepath.Join(storage, "batch", "jobs"))
	if len(dirs) != 5 {
		t.Errorf("%d jobs stored, want 5", len(dirs))
	}
	// A refusal is not stored as an Idempotency-Key's answer: the key is
	// not spent.
	status, _, body := post(t, base+"/batch", `[{"path":"/health"}]`, alice, "Prefer: respond-async", "Idempotency-Key: k1")
	if status != 503 {
		t.Fatalf("idempotent submit to a full queue: %d %s", status, body)
	}
	if status, hdr, body := post(t, base+"/batch", `[{"path":"/health"}]`, alice, "Prefer: respond-async", "Idempotency-Key: k1"); status != 503 || hdr.Get("Idempotent-Replayed") != "" {
		t.Errorf("refusal was stored as the key's answer: %d %v %s", status, hdr, body)
	}
}

func TestAsyncMaxQueuedConfig(t *testing.T) {
	for _, bad := range []string{"max_queued 0", "max_queued -1", "max_queued x", "max_queued", "max_queued 1 2"} {
		d := caddyfile.NewTestDispenser("batch {\n\tasync {\n\t\t" + bad + "\n\t}\n}")
		err := new(Handler).UnmarshalCaddyfile(d)
		if err == nil || !strings.Contains(err.Error(), "Testfile:3") {
			t.Errorf("%q: %v", bad, err)
		}
	}
	h := new(Handler)
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("batch {\n\tasync {\n\t\tmax_queued 7\n\t}\n}")); err != nil {
		t.Fatal(err)
	}
	cfg, _ := json.Marshal(h)
	if got := gjson.GetBytes(cfg, "async.max_queued").Int(); got != 7 {
		t.Errorf("max_queued 7 gives %s", cfg)
	}
	h = &Handler{Async: &AsyncConfig{MaxQueued: -1}}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := h.Provision(ctx); err == nil {
		t.Error("max_queued -1 was taken")
	}
}

// When storage stops taking writes mid-job, the job stops running what it
// cannot record, ends "error", and this instance answers for it from
// memory until its record is stored.
func TestAsyncStorageFailsMidJob(t *testing.T) {
	setVar(t, &storeRetry, 5*time.Millisecond)
	t.Cleanup(func() { flakyBroken.Store(false) })
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if r.URL.Path == "/break" {
			flakyBroken.Store(true)
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"ok":true}`)
	}))
	t.Cleanup(srv.Close)
	storage := t.TempDir()
	base := startFlakyCaddy(t, storage, "batch /batch /batch/* {\n\tmax_ops 1000\n\tasync\n}\nreverse_proxy "+srv.Listener.Addr().String())

	// Results 0-99 are stored; storage breaks at 150, so 100-199 are not.
	var ops []string
	for i := range 300 {
		p := "/ok"
		if i == 150 {
			p = "/break"
		}
		ops = append(ops, fmt.Sprintf(`{"path":"%s"}`, p))
	}
	id := submitJob(t, base+"/batch", "["+strings.Join(ops, ",")+"]")
	job := base + "/batch/" + id
	p := waitJob(t, job, alice, "completed", "error")
	if p.Get("status").String() != "error" || !strings.Contains(p.Get("error").String(), errFlaky.Error()) {
		t.Fatalf("progress with storage down: %s", p.Raw)
	}
	if p.Get("skipped").Int() != 100 || calls.Load() != 200 {
		t.Errorf("ran %d operations with storage down, skipped %d: %s", calls.Load(), p.Get("skipped").Int(), p.Raw)
	}
	if status, body := del(t, job, alice); status != 409 {
		t.Errorf("cancel of the ended job: %d %s", status, body)
	}
	status, _, body := get(t, job+"/results", alice)
	res := mustJSON(t, body)
	if status != 200 || len(res.Get("results").Array()) != 100 || res.Get("results.99.id").String() != "99" ||
		!strings.Contains(res.Get("error").String(), errFlaky.Error()) {
		t.Errorf("results of the error job: %d %.300s", status, body)
	}

	// Storage recovers: the record is stored, and the pool lets go of it.
	flakyBroken.Store(false)
	eventually(t, 10*time.Second, "record stored", func() bool {
		b, _ := os.ReadFile(filepath.Join(storage, "batch", "jobs", id, "job"))
		return gjson.GetBytes(b, "status").String() == "error"
	})
	eventually(t, 10*time.Second, "job dropped from memory", func() bool { return thePool(t).lookup(id) == nil })
	if p := waitJob(t, job, alice, "error"); p.Get("skipped").Int() != 100 {
		t.Errorf("progress from storage: %s", p.Raw)
	}
	if _, _, body := get(t, job+"/results?offset=98", alice); len(mustJSON(t, body).Get("results").Array()) != 2 {
		t.Errorf("last page of the error job: %.300s", body)
	}
}

// A job's context ends at its ExpiresAt, not retention after it starts.
func TestAsyncJobDeadlineIsExpiry(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	id := submitJob(t, base+"/batch", `[{"path":"/slow?d=5s&id=x"}]`)
	var j *job
	eventually(t, 10*time.Second, "job running", func() bool {
		j = thePool(t).lookup(id)
		return j != nil && j.snapshot().Status == jobRunning
	})
	j.mu.Lock()
	rn := j.rn
	j.mu.Unlock()
	if d, ok := rn.ctx.Deadline(); !ok || !d.Equal(j.snapshot().ExpiresAt) {
		t.Errorf("job's deadline %v, its expiry %v", d, j.snapshot().ExpiresAt)
	}
}

// A job that expired while it waited for a worker never runs.
func TestAsyncExpiredInQueueDoesNotRun(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddyIn(t, storage, fmt.Sprintf(`
	batch /long /long/* {
		async {
			workers 1
		}
	}
	batch /short /short/* {
		async {
			retention 1s
			workers 1
		}
	}
	reverse_proxy %s`, be.addr()))
	submitJob(t, base+"/long", `[{"path":"/slow?d=2s&id=a"}]`)
	eventually(t, 10*time.Second, "the long job running", func() bool { return len(be.eventLog()) > 0 })
	id := submitJob(t, base+"/short", `[{"path":"/slow?d=1ms&id=b"}]`)
	eventually(t, 10*time.Second, "the long job done", func() bool { return len(be.eventLog()) >= 2 })
	eventually(t, 10*time.Second, "the expired job gone from the pool", func() bool { return thePool(t).lookup(id) == nil })
	for _, e := range be.eventLog() {
		if e == "start b" {
			t.Errorf("the job ran after it expired: %v", be.eventLog())
		}
	}
	if status, _, _ := get(t, base+"/short/"+id, alice); status != 404 {
		t.Errorf("expired job: %d", status)
	}
	eventually(t, 5*time.Second, "expired job deleted from storage", func() bool {
		_, err := os.Stat(filepath.Join(storage, "batch", "jobs", id))
		return errors.Is(err, fs.ErrNotExist)
	})
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

// Webhook deliveries, backoff waits included, end with the config: a
// grace at Destruct, then they are canceled.
func TestAsyncWebhookDeliveriesEndWithConfig(t *testing.T) {
	setVar(t, &webhookBackoff, time.Hour)
	setVar(t, &webhookGrace, 50*time.Millisecond)
	attempts := make(chan struct{}, 10)
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		attempts <- struct{}{}
		w.WriteHeader(500)
	}))
	t.Cleanup(recv.Close)
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, "webhook "+recv.URL+" {\n\tsecret s\n}"))
	waitJob(t, base+"/batch/"+submitJob(t, base+"/batch", `[{"path":"/health"}]`), alice, "completed")
	select {
	case <-attempts:
	case <-time.After(10 * time.Second):
		t.Fatal("no delivery")
	}
	if n := goroutinesIn("(*Webhook).deliver"); n != 1 {
		t.Fatalf("%d deliveries in flight, want 1", n)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "delivery ended with the config", func() bool { return goroutinesIn("(*Webhook).deliver") == 0 })
}

// Deliveries in flight at once are bounded: a receiver that never answers
// does not make every ended job hold a goroutine.
func TestAsyncWebhookDeliveriesBounded(t *testing.T) {
	setVar(t, &maxDeliveries, 2)
	setVar(t, &webhookGrace, 50*time.Millisecond)
	var mu sync.Mutex
	inFlight, most := 0, 0
	hang := make(chan struct{})
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		inFlight++
		most = max(most, inFlight)
		mu.Unlock()
		select {
		case <-hang:
		case <-r.Context().Done():
		}
		mu.Lock()
		inFlight--
		mu.Unlock()
	}))
	t.Cleanup(recv.Close)
	t.Cleanup(func() { close(hang) })
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, "webhook "+recv.URL+" {\n\tsecret s\n}"))
	for range 5 {
		waitJob(t, base+"/batch/"+submitJob(t, base+"/batch", `[{"path":"/health"}]`), alice, "completed")
	}
	eventually(t, 5*time.Second, "two deliveries waiting", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return inFlight == 2
	})
	if n := goroutinesIn("(*Webhook).deliver"); n != 2 {
		t.Errorf("%d deliveries in flight, want 2", n)
	}
}

// Job directories without a readable record are swept once everything in
// them is older than the retention.
func TestAsyncSweepsJobsWithoutRecord(t *testing.T) {
	storage := t.TempDir()
	fsys := &certmagic.FileStorage{Path: storage}
	fresh, noRecord, badRecord := strings.Repeat("0", 32), strings.Repeat("1", 32), strings.Repeat("2", 32)
	for _, k := range []string{
		jobKey(fresh, "results", "000000"),
		jobKey(noRecord, "results", "000000"),
		jobKey(badRecord, "job"),
	} {
		if err := fsys.Store(context.Background(), k, []byte("{")); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * time.Hour)
	for _, id := range []string{noRecord, badRecord} {
		_ = filepath.WalkDir(filepath.Join(storage, "batch", "jobs", id), func(p string, _ fs.DirEntry, err error) error {
			if err == nil {
				err = os.Chtimes(p, old, old)
			}
			return err
		})
	}
	startCaddyIn(t, storage, "batch /batch /batch/* {\n\tasync {\n\t\tretention 1h\n\t}\n}\nrespond 404")
	eventually(t, 10*time.Second, "old job directories swept", func() bool {
		_, err1 := os.Stat(filepath.Join(storage, "batch", "jobs", noRecord))
		_, err2 := os.Stat(filepath.Join(storage, "batch", "jobs", badRecord))
		return errors.Is(err1, fs.ErrNotExist) && errors.Is(err2, fs.ErrNotExist)
	})
	if _, err := os.Stat(filepath.Join(storage, "batch", "jobs", fresh)); err != nil {
		t.Errorf("a recent job directory was swept: %v", err)
	}
}
