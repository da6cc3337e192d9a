package batch

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tidwall/gjson"
)

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

// A job's context ends where its window does, not window after it
// starts; until it ends, it is kept until retention after that.
func TestAsyncJobDeadlineIsWindowEnd(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, "window 2h"))
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
	rec := j.snapshot()
	if d, ok := rn.base.Deadline(); !ok || !d.Equal(*rec.WindowEndsAt) || !d.Equal(rec.CreatedAt.Add(2*time.Hour)) {
		t.Errorf("job's deadline %v, its window's end %v, created %v", d, rec.WindowEndsAt, rec.CreatedAt)
	}
	if !rec.ExpiresAt.Equal(rec.CreatedAt.Add(3 * time.Hour)) {
		t.Errorf("a running job with window 2h and retention 1h expires at %v, created %v", rec.ExpiresAt, rec.CreatedAt)
	}
}

// A job still running when its window ends starts no further operation:
// the rest are skipped, it ends expired, and its results stay readable for
// retention after its end, not after its creation.
func TestAsyncWindowExpiresRunningJob(t *testing.T) {
	ahead := skewClock(t)
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, asyncSite(be, "window 1h"), inStorage(storage)) // retention 1h
	ops := []string{`{"path":"/hold?id=h"}`}
	for i := range 9 {
		ops = append(ops, fmt.Sprintf(`{"path":"/slow?id=s%d"}`, i))
	}
	id := submitJob(t, base+"/batch", "["+strings.Join(ops, ",")+"]")
	eventually(t, 10*time.Second, "the first operation held", func() bool { return slices.Contains(be.eventLog(), "start h") })
	ahead(90 * time.Minute) // past the window, while the first operation runs
	be.release()
	p := waitJob(t, base+"/batch/"+id, alice, stateExpired, stateCompleted, stateError)
	if p.Get("status").String() != stateExpired || p.Get("succeeded").Int() != 1 || p.Get("skipped").Int() != 9 {
		t.Fatalf("a job whose window passed as it ran: %s", p.Raw)
	}
	if log := be.eventLog(); len(log) != 2 {
		t.Errorf("operations sent after the window: %v", log)
	}
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results", "", alice)
	res := mustJSON(t, body)
	if res.Get("status").String() != statusExpired || res.Get("results.0.status").Int() != 200 ||
		res.Get("results.9.status").Int() != 424 || res.Get("results.9.error").String() != errWindowSkip {
		t.Errorf("results: %.600s", body)
	}
	// Ended 90 minutes after it was created: kept until 150 minutes, where
	// retention counted from its creation would have ended at 60.
	raw, err := os.ReadFile(filepath.Join(storage, "batch", "jobs", id, "job"))
	if err != nil {
		t.Fatal(err)
	}
	if exp, end := gjson.GetBytes(raw, "expires_at").Time(), gjson.GetBytes(raw, "completed_at").Time(); !exp.Equal(end.Add(time.Hour)) {
		t.Errorf("expires at %v, ended %v: not retention after its end", exp, end)
	}
	ahead(140 * time.Minute)
	if status, _, body := send(t, "GET", base+"/batch/"+id+"/results?offset=9", "", alice); status != 200 || !strings.Contains(body, errWindowSkip) {
		t.Errorf("results 50 minutes after the end: %d %.200s", status, body)
	}
	ahead(151 * time.Minute)
	if status, _, _ := send(t, "GET", base+"/batch/"+id, "", alice); status != 404 {
		t.Errorf("a job past retention after its end: %d", status)
	}
}

// The window ends operations in flight too, in real time: cut off (504),
// the rest skipped.
func TestAsyncWindowCutsOperationInFlight(t *testing.T) {
	be := newBackend(t)
	t.Cleanup(be.release)
	base := startCaddy(t, asyncSite(be, "window 1s"))
	id := submitJob(t, base+"/batch", `[{"path":"/hold?id=h"},{"path":"/slow?id=s"}]`)
	p := waitJob(t, base+"/batch/"+id, alice, stateExpired, stateCompleted, stateError)
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results", "", alice)
	res := mustJSON(t, body)
	if p.Get("status").String() != stateExpired || res.Get("results.0.status").Int() != 504 || res.Get("results.0.error").String() != errWindowCut ||
		res.Get("results.1.status").Int() != 424 || res.Get("results.1.error").String() != errWindowSkip || slices.Contains(be.eventLog(), "start s") {
		t.Errorf("%s\n%s", p.Raw, body)
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

// A streamed job runs its operations as one stream across its chunks: a
// slow operation does not hold back the next chunk, whose operations are
// read while the current ones run, on a storage a network away.
func TestStreamedJobHasNoChunkBarrier(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, proxySite(be, `{
		mode parallel
		concurrency 8
		async
	}`), inStorage(storage), onLaggedStorage("5ms"))
	var lines []string
	for i := range 2*opsPerChunk + 10 {
		d := "1ms"
		if i == 0 {
			d = "3s" // the first operation of the first chunk is slow
		}
		lines = append(lines, fmt.Sprintf(`{"path":"/slow?id=k%d&d=%s"}`, i, d))
	}
	status, body := sendNDJSON(t, base+"/batch", strings.Join(lines, "\n"))
	if status != 202 {
		t.Fatalf("%d %s", status, body)
	}
	id := mustJSON(t, body).Get("id").String()
	eventually(t, 30*time.Second, "the slow operation done", func() bool { return slices.Contains(be.eventLog(), "end k0") })
	log := be.eventLog()
	end0 := slices.Index(log, "end k0")
	if i := slices.Index(log, fmt.Sprintf("start k%d", opsPerChunk+5)); i < 0 || i > end0 {
		t.Errorf("an operation of the second chunk started at event %d, the slow one of the first ended at %d", i, end0)
	}
	p := waitJob(t, base+"/batch/"+id, alice, "completed")
	if p.Get("succeeded").Int() != 2*opsPerChunk+10 {
		t.Errorf("the job: %s", p.Raw)
	}
	_, _, results := send(t, "GET", base+"/batch/"+id+"/results?offset=0&limit=2", "", alice)
	if r := mustJSON(t, results).Get("results"); r.Get("0.id").String() != "0" || r.Get("1.id").String() != "1" {
		t.Errorf("results out of order: %.300s", results)
	}
}

// A job run leaves nothing running behind it: the watch for the loss of
// its hold on the job ends with the run. It was left waiting, one
// goroutine and one context under the pool's for every job run.
func TestJobRunsLeaveNoGoroutine(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, "credentials_key "+testKey))
	run := func(n int) {
		for range n {
			id := submitJob(t, base+"/batch", `[{"path":"/health"}]`)
			waitJob(t, base+"/batch/"+id, alice, stateCompleted)
		}
	}
	run(5)
	time.Sleep(200 * time.Millisecond)
	before := runtime.NumGoroutine()
	const jobs = 40
	run(jobs)
	eventually(t, 10*time.Second, "the goroutines of the jobs' runs ended", func() bool {
		return runtime.NumGoroutine() < before+jobs/2
	})
}
