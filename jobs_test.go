package batch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"github.com/tidwall/gjson"
)

// A job's results wait in memory until about 1 MiB, not until 100 of
// them: 24 answers of 1 MB do not make a job hold 24 MB, and readers of
// its results hold one stored part each, not a chunk of 100.
func TestAsyncResultsFlushedBySize(t *testing.T) {
	const n, size = 24, 1_000_000
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
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch /batch/* {
		max_response_size 1MB
		async {
			workers 1
		}
	}
	reverse_proxy %s`, srv.Listener.Addr()), inStorage(storage))

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
	// its encoding: a few MB. Buffering 100 results would hold all 24.
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
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results?offset=17&limit=3", "", alice)
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
		req := request(t, "GET", base+"/batch/"+id+"/results", "", alice)
		go func() {
			defer done.Done()
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
	waitGroup(t, 40*time.Second, "the readers to read half of the results", &read)
	var held int64
	for range 3 {
		held = max(held, int64(liveHeap())-int64(before))
		time.Sleep(20 * time.Millisecond)
	}
	close(release)
	waitGroup(t, 40*time.Second, "the readers to read the rest", &done)
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

// When storage stops taking writes mid-job, the job stops running what it
// cannot record, ends "error", and this instance answers for it from
// memory until its record is stored.
func TestAsyncStorageFailsMidJob(t *testing.T) {
	setVar(t, &storeRetry, 100*time.Microsecond)
	setVar(t, &checkpointEvery, time.Hour) // results are stored by the hundred
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
	base := startCaddy(t, "batch /batch /batch/* {\n\tmax_ops 1000\n\tasync\n}\nreverse_proxy "+srv.Listener.Addr().String(), inStorage(storage), onFlakyStorage)

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
	// Results are stored beside the operations: those that ran while the
	// write of 100-199 was being refused ran, and the rest was skipped.
	if skipped := p.Get("skipped").Int(); skipped == 0 || calls.Load() < 200 || calls.Load()+skipped != 300 {
		t.Errorf("ran %d operations with storage down, skipped %d: %s", calls.Load(), skipped, p.Raw)
	}
	if status, _, body := send(t, "DELETE", job, "", alice); status != 409 {
		t.Errorf("cancel of the ended job: %d %s", status, body)
	}
	status, _, body := send(t, "GET", job+"/results", "", alice)
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
	if p := waitJob(t, job, alice, "error"); p.Get("skipped").Int() == 0 || p.Get("completed").Int() != 300 {
		t.Errorf("progress from storage: %s", p.Raw)
	}
	if _, _, body := send(t, "GET", job+"/results?offset=98", "", alice); len(mustJSON(t, body).Get("results").Array()) != 2 {
		t.Errorf("last page of the error job: %.300s", body)
	}
}

// A job's context ends at its ExpiresAt, not retention after it starts.
func TestAsyncJobDeadlineIsExpiry(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	t.Cleanup(be.release) // the shutdown has no operation to wait for
	id := submitJob(t, base+"/batch", `[{"path":"/hold?id=x"}]`)
	var j *job
	eventually(t, 10*time.Second, "job running", func() bool {
		j = thePool(t).lookup(id)
		return j != nil && j.snapshot().Status == stateRunning
	})
	j.mu.Lock()
	rn := j.rn
	j.mu.Unlock()
	if d, ok := rn.base.Deadline(); !ok || !d.Equal(j.snapshot().ExpiresAt) {
		t.Errorf("job's deadline %v, its expiry %v", d, j.snapshot().ExpiresAt)
	}
}

// A job that expired while it waited for a worker never runs.
func TestAsyncExpiredInQueueDoesNotRun(t *testing.T) {
	ahead := skewClock(t)
	setVar(t, &cancelPoll, 20*time.Millisecond)
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, fmt.Sprintf(`
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
	reverse_proxy %s`, be.addr()), inStorage(storage))
	// The long job holds the one worker until it is canceled, after the
	// clock has gone past the short job's expiry.
	long := submitJob(t, base+"/long", "["+strings.TrimSuffix(strings.Repeat(`{"path":"/slow?d=50ms&id=a"},`, 200), ",")+"]")
	eventually(t, 10*time.Second, "the long job running", func() bool { return len(be.eventLog()) > 0 })
	id := submitJob(t, base+"/short", `[{"path":"/slow?d=1ms&id=b"}]`)
	ahead(2 * time.Second) // past the short job's retention, while it waits
	if status, _, body := send(t, "DELETE", base+"/long/"+long, "", alice); status != 200 && status != 202 {
		t.Fatalf("cancel of the long job: %d %s", status, body)
	}
	waitJob(t, base+"/long/"+long, alice, "canceled")
	eventually(t, 10*time.Second, "the expired job gone from the pool", func() bool { return thePool(t).lookup(id) == nil })
	for _, e := range be.eventLog() {
		if e == "start b" {
			t.Errorf("the job ran after it expired: %v", be.eventLog())
		}
	}
	if status, _, _ := send(t, "GET", base+"/short/"+id, "", alice); status != 404 {
		t.Errorf("expired job: %d", status)
	}
	eventually(t, 5*time.Second, "expired job deleted from storage", func() bool {
		_, err := os.Stat(filepath.Join(storage, "batch", "jobs", id))
		return errors.Is(err, fs.ErrNotExist)
	})
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
	startCaddy(t, "batch /batch /batch/* {\n\tasync {\n\t\tretention 1h\n\t}\n}\nrespond 404", inStorage(storage))
	eventually(t, 10*time.Second, "old job directories swept", func() bool {
		_, err1 := os.Stat(filepath.Join(storage, "batch", "jobs", noRecord))
		_, err2 := os.Stat(filepath.Join(storage, "batch", "jobs", badRecord))
		return errors.Is(err1, fs.ErrNotExist) && errors.Is(err2, fs.ErrNotExist)
	})
	if _, err := os.Stat(filepath.Join(storage, "batch", "jobs", fresh)); err != nil {
		t.Errorf("a recent job directory was swept: %v", err)
	}
}

// Two Caddy instances on one storage: either answers for a job the other runs.
func TestAsyncTwoInstancesShareStorage(t *testing.T) {
	be := newBackend(t)
	a, b, _ := twoCaddies(t, t.TempDir(), "batch /batch /batch/* {\n\tasync\n}\nreverse_proxy "+be.addr())

	// Submitted to A, followed and read on B.
	_, _, body := send(t, "POST", a+"/batch", `[{"path":"/slow?d=200ms"},{"path":"/health"}]`, alice, "Prefer: respond-async")
	id := mustJSON(t, body).Get("id").String()
	if status, _, body := send(t, "GET", b+"/batch/"+id, "", alice); status != 200 || !strings.Contains(body, id) {
		t.Fatalf("B does not see A's job: %d %s", status, body)
	}
	waitJob(t, b+"/batch/"+id, alice, "completed")
	_, _, body = send(t, "GET", b+"/batch/"+id+"/results", "", alice)
	if res := mustJSON(t, body); res.Get("results.1.body.status").String() != "ok" {
		t.Errorf("results through B: %s", body)
	}
	if status, _, _ := send(t, "GET", b+"/batch/"+id, "", "Authorization: Bearer mallory"); status != 404 {
		t.Errorf("B must check the owner too: %d", status)
	}

	// Canceled through B while A runs it.
	var ops []string
	for i := range 40 {
		ops = append(ops, fmt.Sprintf(`{"path":"/slow?id=c%d&d=50ms"}`, i))
	}
	_, _, body = send(t, "POST", a+"/batch", "["+strings.Join(ops, ",")+"]", alice, "Prefer: respond-async")
	id = mustJSON(t, body).Get("id").String()
	if status, _, body := send(t, "DELETE", b+"/batch/"+id, "", alice); status != 202 {
		t.Fatalf("cancel through B: %d %s", status, body)
	}
	p := waitJob(t, b+"/batch/"+id, alice, "canceled")
	if p.Get("skipped").Int() == 0 {
		t.Errorf("cancel through B skipped nothing: %s", p.Raw)
	}
}

// A config reload while a job runs neither drops nor repeats its operations.
func TestAsyncSurvivesReload(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	port := freePort(t)
	cfg := func(greeting string) []byte {
		return adapt(t, testCaddyfile(storage, port, "", fmt.Sprintf("batch /batch /batch/* {\n\tasync\n}\nrespond /hello %q\nreverse_proxy %s", greeting, be.addr())))
	}
	base := loadCaddy(t, cfg("one"), port)
	var ops []string
	for i := range 20 {
		ops = append(ops, fmt.Sprintf(`{"path":"/slow?id=r%d&d=20ms"}`, i))
	}
	_, _, body := send(t, "POST", base+"/batch", "["+strings.Join(ops, ",")+"]", alice, "Prefer: respond-async")
	id := mustJSON(t, body).Get("id").String()
	eventually(t, 10*time.Second, "the job under way", func() bool { return len(be.eventLog()) >= 4 })
	if err := caddy.Load(cfg("two"), true); err != nil {
		t.Fatal(err)
	}
	if _, _, body := send(t, "GET", base+"/hello", ""); body != "two" {
		t.Fatalf("reload did not take: %q", body)
	}
	p := waitJob(t, base+"/batch/"+id, alice, "completed", "error")
	if p.Get("status").String() != "completed" || p.Get("succeeded").Int() != 20 {
		t.Errorf("job across a reload: %s", p.Raw)
	}
	counts := map[string]int{}
	for _, e := range be.eventLog() {
		counts[e]++
	}
	for i := range 20 {
		if n := counts[fmt.Sprintf("start r%d", i)]; n != 1 {
			t.Errorf("operation r%d ran %d times", i, n)
		}
	}
}

// A job whose operations inherit credentials, with no credentials_key to
// store them, runs only where it was taken: a shutdown lets it run on for
// the grace, then ends it "error"/"interrupted" with the results it has,
// which a restarted instance serves.
func TestAsyncInterruptedByShutdown(t *testing.T) {
	setVar(t, &jobsGrace, 200*time.Millisecond)
	be := newBackend(t)
	storage := t.TempDir()
	port := freePort(t)
	cfgJSON := adapt(t, testCaddyfile(storage, port, "", "batch /batch /batch/* {\n\tasync\n}\nreverse_proxy "+be.addr()))
	base := loadCaddy(t, cfgJSON, port)
	var ops []string
	for i := range 20 {
		ops = append(ops, fmt.Sprintf(`{"path":"/slow?id=s%d&d=50ms"}`, i))
	}
	_, _, body := send(t, "POST", base+"/batch", "["+strings.Join(ops, ",")+"]", alice, "Prefer: respond-async")
	id := mustJSON(t, body).Get("id").String()
	eventually(t, 10*time.Second, "the job under way", func() bool { return len(be.eventLog()) >= 4 })
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	base = loadCaddy(t, cfgJSON, port)
	p := waitJob(t, base+"/batch/"+id, alice, "completed", "error")
	if p.Get("status").String() != "error" || p.Get("error").String() != "interrupted" {
		t.Errorf("after shutdown: %s", p.Raw)
	}
	_, _, body = send(t, "GET", base+"/batch/"+id+"/results", "", alice)
	res := mustJSON(t, body)
	if res.Get("results.0.status").Int() != 200 || res.Get("results.19.status").Int() != 503 {
		t.Errorf("results kept after interruption: %.400s", body)
	}
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

// A graceful restart of a lone instance hands its jobs over to itself: the
// job resumes where it was, each operation runs once, and those after the
// restart still carry the submitter's credentials and their idempotency
// key.
func TestAsyncResumesAfterRestart(t *testing.T) {
	be := newBackend(t)
	base, restart := restartableCaddy(t, be)
	var ops []string
	for i := range 30 {
		ops = append(ops, fmt.Sprintf(`{"id":"r%d","path":"/slow?id=r%d&d=30ms"}`, i, i))
	}
	id := submitJob(t, base+"/batch", "["+strings.Join(ops, ",")+"]")
	eventually(t, 10*time.Second, "a few operations run", func() bool { return len(be.eventLog()) >= 8 })
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	stoppedAt := len(be.requests())
	base = restart()
	p := waitJob(t, base+"/batch/"+id, alice, "completed", "error")
	if p.Get("status").String() != "completed" || p.Get("succeeded").Int() != 30 {
		t.Fatalf("job after a restart: %s", p.Raw)
	}
	counts := map[string]int{}
	for _, e := range be.eventLog() {
		counts[e]++
	}
	for i := range 30 {
		if n := counts[fmt.Sprintf("start r%d", i)]; n != 1 {
			t.Errorf("operation r%d ran %d times across a graceful restart", i, n)
		}
	}
	reqs := be.requests()
	if stoppedAt == 0 || stoppedAt >= len(reqs) {
		t.Fatalf("%d operations before the restart, %d in all: the restart did not fall mid-job", stoppedAt, len(reqs))
	}
	for _, r := range reqs[stoppedAt:] {
		opID := strings.TrimPrefix(strings.SplitN(r.Path, "&", 2)[0], "/slow?id=")
		if r.Header.Get("Authorization") != strings.TrimPrefix(alice, "Authorization: ") || r.Header.Get("Idempotency-Key") != id+"."+opID {
			t.Errorf("resumed operation %s sent with Authorization %q, Idempotency-Key %q", r.Path, r.Header.Get("Authorization"), r.Header.Get("Idempotency-Key"))
		}
	}
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results", "", alice)
	if res := mustJSON(t, body).Get("results"); len(res.Array()) != 30 || res.Get("29.id").String() != "r29" || res.Get("29.status").Int() != 200 {
		t.Errorf("results across a restart: %.300s", body)
	}
}

// A 10,000-operation job holds its results in storage, not in memory.
func TestAsyncLargeJobMemory(t *testing.T) {
	base := startCaddy(t, `
	batch /batch /batch/* {
		max_ops 10000
		max_body_size 4MB
		async
	}
	header /item/* Content-Type application/json
	respond /item/* `+"`"+`{"ok":true,"pad":"0123456789012345678901234567890123456789012345678901234567890123456789"}`+"`")
	var sb strings.Builder
	sb.WriteString("[")
	for i := range 10000 {
		if i > 0 {
			sb.WriteString(",")
		}
		fmt.Fprintf(&sb, `{"path":"/item/%d"}`, i)
	}
	sb.WriteString("]")

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	var peak uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var m runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
				runtime.ReadMemStats(&m)
				peak = max(peak, m.HeapInuse)
			}
		}
	}()
	status, _, body := send(t, "POST", base+"/batch", sb.String(), alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("%d %s", status, body)
	}
	id := mustJSON(t, body).Get("id").String()
	p := waitJob(t, base+"/batch/"+id, alice, "completed")
	close(stop)
	receive(t, 5*time.Second, "the heap sampler to stop", sampled)
	if p.Get("succeeded").Int() != 10000 {
		t.Fatalf("job: %s", p.Raw)
	}
	growth := int64(peak) - int64(before.HeapInuse)
	t.Logf("heap in use before %d MiB, peak %d MiB, growth %d MiB", before.HeapInuse>>20, peak>>20, growth>>20)
	// The results alone are ~1.5 MB encoded; the request body is ~0.2 MB.
	if growth > 64<<20 {
		t.Errorf("heap grew %d MiB running a 10,000-operation job", growth>>20)
	}
	_, _, body = send(t, "GET", base+"/batch/"+id+"/results?offset=9990", "", alice)
	if r := mustJSON(t, body).Get("results"); len(r.Array()) != 10 || r.Get("9.id").String() != "9999" {
		t.Errorf("last page: %.300s", body)
	}
}

// A job queued before a config reload runs, once it starts, through the
// new config; one already running finishes on its own.
func TestQueuedJobRunsOnNewConfig(t *testing.T) {
	before, after := newBackend(t), newBackend(t)
	storage := t.TempDir()
	port := freePort(t)
	cfg := func(be *backend) []byte {
		return adapt(t, testCaddyfile(storage, port, "", proxySite(be, "{\n\t\tasync {\n\t\t\tworkers 1\n\t\t}\n\t}")))
	}
	base := loadCaddy(t, cfg(before), port)
	running := submitJob(t, base+"/batch", `[{"path":"/slow?id=run&d=600ms"},{"path":"/health"}]`)
	queued := submitJob(t, base+"/batch", `[{"path":"/health"}]`)
	eventually(t, 10*time.Second, "the first job to start", func() bool { return slices.Contains(before.eventLog(), "start run") })
	if err := caddy.Load(cfg(after), true); err != nil {
		t.Fatal(err)
	}
	// A poll reaches the new config's handler.
	waitJob(t, base+"/batch/"+queued, alice, "completed")
	waitJob(t, base+"/batch/"+running, alice, "completed")
	seen := func(be *backend) (paths []string) {
		for _, r := range be.requests() {
			paths = append(paths, r.Path)
		}
		return paths
	}
	if got := seen(before); !slices.Equal(got, []string{"/slow?id=run&d=600ms", "/health"}) {
		t.Errorf("the old config's backend saw %v: the running job's operations only", got)
	}
	if got := seen(after); !slices.Equal(got, []string{"/health"}) {
		t.Errorf("the new config's backend saw %v: the queued job's operation", got)
	}
}
