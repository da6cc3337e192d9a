package batch

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-batch/batch/internal/lagstore"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
)

// clusterJob runs a 500-operation job on a child instance sharing its
// storage with this one, stops the child with sig mid-job, and checks
// that this instance resumes the job within the lease and completes it,
// every operation with one result. It returns how long the job waited
// between the stop and its next operation, and the operations the backend
// saw more than once; each of those must have come again with the same
// idempotency key.
func clusterJob(t *testing.T, sig syscall.Signal, lease time.Duration) (gap time.Duration, again []string) {
	be := newBackend(t)
	a, b, child := twoCaddies(t, t.TempDir(), proxySite(be, `{
		mode parallel
		async {
			credentials_key `+testKey+`
			lease `+lease.String()+`
		}
	}`))

	const n = 500
	var sb strings.Builder
	for i := range n {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, `{"id":"k%d","path":"/slow?id=k%d&d=10ms"}`, i, i)
	}
	id := submitJob(t, b+"/batch", "["+sb.String()+"]")
	eventually(t, 20*time.Second, "the child well into the job", func() bool { return len(be.requests()) >= 100 })
	if err := child.Signal(sig); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	receive(t, 20*time.Second, "the child to end after "+sig.String(), child.exited)
	before := len(be.requests())

	p := waitJob(t, a+"/batch/"+id, alice, "completed", "error")
	if p.Get("status").String() != "completed" || p.Get("succeeded").Int() != n || p.Get("completed").Int() != n {
		t.Fatalf("job after the child stopped: %s", p.Raw)
	}
	reqs := be.requests()
	if len(reqs) <= before {
		t.Fatalf("nothing ran after the child stopped")
	}
	for _, r := range reqs[before:] {
		if r.At.After(stopped) && strings.HasPrefix(r.Path, "/slow") {
			gap = r.At.Sub(stopped)
			break
		}
	}
	if gap > lease+lease/2 {
		t.Errorf("the job waited %v after its instance stopped; the lease is %v", gap, lease)
	}

	// Every operation reached the backend; those that came twice came with
	// the same key, and the submitter's credentials.
	keys := map[string][]string{}
	for _, r := range reqs {
		u, _ := url.Parse(r.Path)
		op := u.Query().Get("id")
		if u.Path != "/slow" {
			continue // the harness's own probes
		}
		keys[op] = append(keys[op], r.Header.Get("Idempotency-Key"))
		if r.Header.Get("Authorization") != "Bearer alice" {
			t.Fatalf("operation %s sent with Authorization %q", op, r.Header.Get("Authorization"))
		}
	}
	for i := range n {
		op := fmt.Sprintf("k%d", i)
		ks := keys[op]
		if len(ks) == 0 {
			t.Fatalf("operation %s never reached the backend", op)
		}
		for _, k := range ks {
			if k != id+"."+op {
				t.Errorf("operation %s sent with Idempotency-Key %q", op, k)
			}
		}
		if len(ks) > 1 {
			again = append(again, op)
		}
	}

	// One result per operation, in order.
	_, _, body := send(t, "GET", a+"/batch/"+id+"/results?limit=10000", "", alice)
	res := mustJSON(t, body).Get("results").Array()
	if len(res) != n {
		t.Fatalf("%d results of %d operations", len(res), n)
	}
	for i, r := range res {
		if r.Get("id").String() != fmt.Sprintf("k%d", i) || r.Get("status").Int() != 200 {
			t.Fatalf("result %d: %s", i, r.Raw)
		}
	}
	return gap, again
}

// An instance killed mid-job: another sharing its storage resumes the job
// once the lease expires; what runs twice is what the dead one had in
// flight or had not yet stored (the last checkpointEvery of it, and the
// writes under way).
func TestAsyncResumedAfterKill(t *testing.T) {
	gap, again := clusterJob(t, syscall.SIGKILL, 2*time.Second)
	t.Logf("resumed %v after the kill; %d operations sent twice: %v", gap, len(again), again)
	// Concurrency 10 in flight, and what finished within checkpointEvery.
	if len(again) > 150 {
		t.Errorf("%d operations sent twice after a kill", len(again))
	}
}

// An instance stopped gracefully hands its job over at once: no operation
// is sent twice.
func TestAsyncHandedOverAtGracefulStop(t *testing.T) {
	// Left to expire, the lease would keep the job waiting 5.5 s at least.
	gap, again := clusterJob(t, syscall.SIGTERM, 10*time.Second)
	t.Logf("resumed %v after the stop", gap)
	if len(again) > 0 {
		t.Errorf("a graceful hand-over sent %d operations twice: %v", len(again), again)
	}
	if gap > 3*time.Second {
		t.Errorf("the job waited %v after a graceful stop: its lease was not released", gap)
	}
}

// A job is stored whole before it is listed in the cluster's queue, and
// a holder's heartbeat and the job's holder before it is listed under the
// holder: an instance that found it listed without them would take it and
// run it beside the instance that accepted it.
func TestJobStoredBeforeListed(t *testing.T) {
	var mu sync.Mutex
	var queued, held, early []string
	hook := func(s *certmagic.FileStorage, key string) {
		ctx := context.Background()
		mu.Lock()
		defer mu.Unlock()
		if name, ok := strings.CutPrefix(key, queuePrefix+"/"); ok {
			q, _ := parseQueued(name)
			queued = append(queued, q.id)
			if !s.Exists(ctx, jobKey(q.id, "job")) || !s.Exists(ctx, jobKey(q.id, "spec")) || !s.Exists(ctx, jobKey(q.id, "ops", "000000")) {
				early = append(early, key)
			}
		}
		if rest, ok := strings.CutPrefix(key, heldPrefix+"/"); ok {
			epoch, id, _ := strings.Cut(rest, "/")
			if id == heartbeatName {
				return
			}
			held = append(held, id)
			buf, err := s.Load(ctx, holderKey(id))
			if !s.Exists(ctx, heartbeatKey(epoch)) || err != nil || !strings.Contains(string(buf), epoch) {
				early = append(early, key)
			}
		}
	}
	flakyBeforeStore.Store(&hook)
	t.Cleanup(func() { flakyBeforeStore.Store(nil) })
	be := newBackend(t)
	// Without credentials_key, a job inheriting Authorization is held
	// where it was taken; with one, it waits in the cluster's queue.
	base := startCaddy(t, proxySite(be, "{\n\t\tasync\n\t}"), onFlakyStorage)
	for range 3 {
		id := submitJob(t, base+"/batch", `[{"path":"/a"},{"path":"/b"}]`)
		waitJob(t, base+"/batch/"+id, alice, "completed")
	}
	base = startCaddy(t, proxySite(be, "{\n\t\tasync {\n\t\t\tcredentials_key "+testKey+"\n\t\t}\n\t}"), onFlakyStorage)
	for range 3 {
		id := submitJob(t, base+"/batch", `[{"path":"/a"},{"path":"/b"}]`)
		waitJob(t, base+"/batch/"+id, alice, "completed")
	}
	mu.Lock()
	defer mu.Unlock()
	// Three held where they were taken, three queued and then held by
	// the instance that took them from the queue.
	if len(queued) != 3 || len(held) != 6 || len(early) != 0 {
		t.Errorf("queued %v, held %v; of those keys, stored before what they need: %v", queued, held, early)
	}
}

// A job that another instance took over (a peer whose clock runs ahead
// found this one's heartbeat expired, renewals that came late) stops at
// once and records nothing it did not do: no operation it did not send
// counts as done, nothing stored says 499, and whoever holds it next runs
// what is left.
func TestAsyncLeaseLostRecordsNothingMore(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, asyncSite(be, "lease 1s\n\t\t\tcredentials_key "+testKey), inStorage(storage))
	const n = 40
	var ops []string
	for i := range n {
		ops = append(ops, fmt.Sprintf(`{"id":"k%d","path":"/slow?id=k%d&d=60ms"}`, i, i))
	}
	id := submitJob(t, base+"/batch", "["+strings.Join(ops, ",")+"]")
	eventually(t, 10*time.Second, "ten operations done", func() bool { return len(be.requests()) >= 10 })

	// A peer takes the job as a look does: its heartbeat, the job's
	// holder, and the job listed under it rather than under this one.
	held, _ := filepath.Glob(filepath.Join(storage, "batch", "held", "*", id))
	if len(held) != 1 {
		t.Fatalf("the job is listed under %v", held)
	}
	peer := strings.Repeat("e", 32)
	beat := func(expires time.Time) {
		buf, _ := json.Marshal(heartbeat{ExpiresAt: expires})
		if err := os.MkdirAll(filepath.Join(storage, "batch", "held", peer), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(storage, "batch", "held", peer, heartbeatName), buf, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	beat(time.Now().Add(time.Hour))
	holder, _ := json.Marshal(holderRecord{Epoch: peer})
	if err := os.WriteFile(filepath.Join(storage, "batch", "jobs", id, "holder"), holder, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(storage, "batch", "held", peer, id), []byte(id), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(held[0]); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the job given up", func() bool { return thePool(t).lookup(id) == nil })
	time.Sleep(200 * time.Millisecond) // a write it should not make would land now
	sent := len(be.requests())
	var rec jobRecord
	buf, err := os.ReadFile(filepath.Join(storage, "batch", "jobs", id, "job"))
	if err != nil || json.Unmarshal(buf, &rec) != nil {
		t.Fatalf("job record: %v %s", err, buf)
	}
	if rec.final() || rec.Completed > sent || rec.Succeeded != rec.Completed {
		t.Fatalf("after losing its lease with %d operations sent, the job is recorded %s with %d completed, %d succeeded",
			sent, rec.Status, rec.Completed, rec.Succeeded)
	}
	// The peer's heartbeat expires: the job is taken over, and runs what
	// is left.
	beat(time.Now().Add(-time.Second))
	p := waitJob(t, base+"/batch/"+id, alice, "completed", "error")
	if p.Get("status").String() != "completed" || p.Get("succeeded").Int() != n {
		t.Fatalf("the job taken over: %s", p.Raw)
	}
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results", "", alice)
	if res := mustJSON(t, body); strings.Contains(body, `"status":499`) || res.Get("results.#").Int() != n {
		t.Errorf("results: %s", body)
	}
	got := map[string]int{}
	for _, r := range be.requests() {
		got[r.Path]++
	}
	for i := range n {
		if k := fmt.Sprintf("/slow?id=k%d&d=60ms", i); got[k] == 0 {
			t.Errorf("%s never sent", k)
		}
	}
	// The dead peer's epoch is taken over whole: nothing of the job is
	// listed under it any more.
	if _, err := os.Stat(filepath.Join(storage, "batch", "held", peer, id)); !os.IsNotExist(err) {
		t.Errorf("the job is still listed under the dead peer: %v", err)
	}
}

// A job whose operations can no longer be read from storage ends in error
// when it is taken over: it does not wait in the queue for ever, looked
// at and warned about at every look for orphaned jobs.
func TestAsyncUnreadableSpecFailsJob(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	port := freePort(t)
	cfg := adapt(t, testCaddyfile(storage, port, "", proxySite(be, `{
		async {
			credentials_key `+testKey+`
			lease 1s
			workers 1
		}
	}`)))
	base := loadCaddy(t, cfg, port)
	submitJob(t, base+"/batch", `[{"path":"/slow?d=300ms&id=first"}]`)
	id := submitJob(t, base+"/batch", `[{"path":"/slow?d=1ms&id=second"}]`) // queued behind it
	if err := caddy.Stop(); err != nil {                                    // a graceful stop hands the queued job over
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(storage, "batch", "jobs", id, "spec"), []byte(`{"shape":`), 0o600); err != nil {
		t.Fatal(err)
	}
	base = loadCaddy(t, cfg, port)
	p := waitJob(t, base+"/batch/"+id, alice, "error")
	if !strings.Contains(p.Get("error").String(), "can no longer be read") {
		t.Errorf("the job: %s", p.Raw)
	}
	if slices.Contains(be.eventLog(), "start second") {
		t.Error("the job ran")
	}
}

// callsPer counts this process's storage calls (batch_lag's) per event
// counted by count, over at least n events, and returns the calls by
// method as well.
func callsPer(t *testing.T, count *atomic.Int64, n int64, what string) (float64, lagstore.Counts) {
	t.Helper()
	calls0, n0 := lagstore.Calls(), count.Load()
	eventually(t, 30*time.Second, fmt.Sprintf("%d %s", n, what), func() bool { return count.Load() >= n0+n })
	calls, n1 := lagstore.Calls().Sub(calls0), count.Load()
	return float64(calls.Total()) / float64(n1-n0), calls
}

// heldIn counts the jobs held in storage, under every epoch.
func heldIn(storage string) int {
	keys, _ := filepath.Glob(filepath.Join(storage, "batch", "held", "*", "*"))
	n := 0
	for _, k := range keys {
		if filepath.Base(k) != heartbeatName {
			n++
		}
	}
	return n
}

// submitMany submits jobs of one operation each, /slow?id=<prefix><i>,
// for i from first up to last, four at a time.
func submitMany(t *testing.T, url, prefix string, first, last int) {
	t.Helper()
	var next atomic.Int64
	next.Store(int64(first))
	errs := make(chan error, 4)
	for range 4 {
		go func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(last) {
					errs <- nil
					return
				}
				req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(fmt.Sprintf(`[{"path":"/slow?id=%s%d"}]`, prefix, i)))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Authorization", "Bearer alice")
				req.Header.Set("Prefer", "respond-async")
				resp, err := client.Do(req)
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusAccepted {
						err = fmt.Errorf("submit %d: %d", i, resp.StatusCode)
					}
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// Renewing the hold on 1, 100 or 1,000 jobs (one running, the rest
// waiting in memory) costs the same storage calls: the instance's
// heartbeat and a List of what it holds, not a write per job.
func TestRenewalBounded(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch /batch/* {
		async {
			workers 1
			lease 2s
		}
	}
	reverse_proxy %s`, be.addr()), inStorage(storage), onLaggedStorage("0s"))
	submitJob(t, base+"/batch", `[{"path":"/hold?id=hold"}]`)
	eventually(t, 10*time.Second, "the worker busy", func() bool { return holding(be) == 1 })
	held := 1
	var perRenewal []float64
	for _, n := range []int{1, 100, 1000} {
		submitMany(t, base+"/batch", "j", held, n)
		held = n
		if got := heldIn(storage); got != n {
			t.Fatalf("%d jobs held, want %d", got, n)
		}
		calls, by := callsPer(t, &thePool(t).renewals, 6, "renewals")
		t.Logf("%4d jobs held: %.2f storage calls a renewal (%+v)", n, calls, by)
		perRenewal = append(perRenewal, calls)
	}
	// The heartbeat stored and the epoch listed, and what the running job
	// does meanwhile whatever is held: it looks for a cancel every second,
	// and shares its pacing with the cluster (a store and a list a
	// second), 1.5 calls a renewal; a renewal under way as counting starts
	// or ends may add a part of one over the 6. A write per job held would
	// add 100 and 1,000.
	for i, calls := range perRenewal {
		if calls > 4.5 || calls > perRenewal[0]+1 {
			t.Errorf("%.2f storage calls a renewal with %d jobs held, %.2f with 1; want 3.5 however many", calls, []int{1, 100, 1000}[i], perRenewal[0])
		}
	}
	// The jobs waiting end interrupted, each recording it, before the
	// storage directory goes.
	be.release()
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
}

// A job record that counts more results stored than the job has
// operations (damaged, or written by hand) fails the job where it would
// resume: before, the run indexed its operations past their end, a panic
// in a goroutine of its own, which ended Caddy.
func TestAsyncRecordCountingTooMuchFailsJob(t *testing.T) {
	for _, c := range []struct {
		name             string
		completed, total int
	}{
		{"more than its total", 200, 1},
		{"more than its operations", 200, 300},
		{"fewer than none", -100, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			be := newBackend(t)
			storage := t.TempDir()
			port := freePort(t)
			cfg := adapt(t, testCaddyfile(storage, port, "", proxySite(be, `{
		async {
			credentials_key `+testKey+`
			lease 1s
			workers 1
		}
	}`)))
			base := loadCaddy(t, cfg, port)
			submitJob(t, base+"/batch", `[{"path":"/slow?d=300ms&id=first"}]`)
			id := submitJob(t, base+"/batch", `[{"path":"/slow?d=1ms&id=second"}]`) // queued behind it
			if err := caddy.Stop(); err != nil {                                    // a graceful stop hands the queued job over
				t.Fatal(err)
			}
			key := filepath.Join(storage, "batch", "jobs", id, "job")
			buf, err := os.ReadFile(key)
			if err != nil {
				t.Fatal(err)
			}
			var rec map[string]any
			if err := json.Unmarshal(buf, &rec); err != nil {
				t.Fatal(err)
			}
			rec["completed"], rec["total"] = c.completed, c.total
			buf, _ = json.Marshal(rec)
			if err := os.WriteFile(key, buf, 0o600); err != nil {
				t.Fatal(err)
			}
			base = loadCaddy(t, cfg, port)
			p := waitJob(t, base+"/batch/"+id, alice, "error")
			if !strings.Contains(p.Get("error").String(), "results stored of") {
				t.Errorf("the job: %s", p.Raw)
			}
			if slices.Contains(be.eventLog(), "start second") {
				t.Error("the job ran")
			}
		})
	}
}
