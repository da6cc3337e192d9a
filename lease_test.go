package batch

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

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
// flight or had not yet recorded (at most 50 ms of it).
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

// A job is leased before it is listed among the jobs to take over: an
// instance that found it listed without a lease would take it and run it
// beside the instance that accepted it, until the next renewal.
func TestJobLeasedBeforeListed(t *testing.T) {
	var mu sync.Mutex
	var listed, unleased []string
	hook := func(s *certmagic.FileStorage, key string) {
		id, ok := strings.CutPrefix(key, activePrefix+"/")
		if !ok {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		listed = append(listed, id)
		if !s.Exists(context.Background(), leaseKey(id)) {
			unleased = append(unleased, id)
		}
	}
	flakyBeforeStore.Store(&hook)
	t.Cleanup(func() { flakyBeforeStore.Store(nil) })
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, "{\n\t\tasync\n\t}"), onFlakyStorage)
	for range 3 {
		id := submitJob(t, base+"/batch", `[{"path":"/a"},{"path":"/b"}]`)
		waitJob(t, base+"/batch/"+id, alice, "completed")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(listed) != 3 || len(unleased) != 0 {
		t.Errorf("jobs listed as active: %v; of them listed before their lease was stored: %v", listed, unleased)
	}
}

// A job whose lease another instance took (a peer whose clock runs ahead,
// renewals that failed) stops at once and records nothing it did not do:
// no operation it did not send counts as done, nothing stored says 499,
// and whoever holds the lease next runs what is left.
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
	leaseFile := filepath.Join(storage, "batch", "jobs", id, "lease")
	taken, _ := json.Marshal(leaseRecord{Instance: "a-peer-an-hour-ahead", ExpiresAt: time.Now().Add(time.Hour)})
	if err := os.WriteFile(leaseFile, taken, 0o600); err != nil {
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
	// The lease expires: the job is taken over, and runs what is left.
	expired, _ := json.Marshal(leaseRecord{Instance: "a-peer-an-hour-ahead", ExpiresAt: time.Now().Add(-time.Second)})
	if err := os.WriteFile(leaseFile, expired, 0o600); err != nil {
		t.Fatal(err)
	}
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
