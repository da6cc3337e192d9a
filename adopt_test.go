package batch

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

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

// An all_or_nothing job cut off by a shutdown stores none of its results,
// which a later failure may still undo, and rolls nothing back: where it
// resumes, it runs again from its first operation, with the same
// idempotency keys, and its rollbacks run there.
func TestAllOrNothingJobResumes(t *testing.T) {
	setVar(t, &jobsGrace, 100*time.Millisecond)
	be := newBackend(t)
	base, restart := restartableCaddy(t, be)
	var ops []string
	for i := range 10 {
		ops = append(ops, fmt.Sprintf(`{"id":"a%d","path":"/slow?id=a%d&d=40ms","rollback":{"path":"/slow?id=undo%d"}}`, i, i, i))
	}
	ops = append(ops, `{"id":"last","path":"/users/404"}`)
	id := submitJob(t, base+"/batch", `{"atomicity":"all_or_nothing","batch":[`+strings.Join(ops, ",")+`]}`)
	eventually(t, 10*time.Second, "the job under way", func() bool { return len(be.eventLog()) >= 6 })
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, e := range be.eventLog() {
		if strings.HasPrefix(e, "start undo") {
			t.Fatalf("the stopped instance rolled back: %v", be.eventLog())
		}
	}
	first := len(be.requests())
	base = restart()
	p := waitJob(t, base+"/batch/"+id, alice, "completed", "error")
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results", "", alice)
	res := mustJSON(t, body)
	if p.Get("status").String() != "completed" || res.Get("status").String() != "rolled_back" {
		t.Fatalf("job after the restart: %s\n%.500s", p.Raw, body)
	}
	for i := range 10 {
		if r := res.Get(fmt.Sprintf("results.%d", i)); !r.Get("undone").Bool() || r.Get("rollback.status").Int() != 200 {
			t.Errorf("result %d: %s", i, r.Raw)
		}
	}
	keys := map[string]string{}
	for i, r := range be.requests() {
		k := r.Header.Get("Idempotency-Key")
		if prev, ok := keys[r.Path]; ok && prev != k {
			t.Errorf("%s sent again with key %q, first %q", r.Path, k, prev)
		}
		keys[r.Path] = k
		if strings.Contains(r.Path, "undo") && i < first {
			t.Errorf("rolled back before the restart: %s", r.Path)
		}
	}
}

// An idle instance's look for work costs the same storage calls whether
// the instances sharing its storage hold 1, 100 or 1,000 jobs: it reads
// their heartbeats, not their jobs.
func TestAdoptionBounded(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	// No credentials_key: the jobs stay held where they were taken, and
	// the idle instance has nothing it may take.
	site := fmt.Sprintf(`
	batch /batch /batch/* {
		async {
			workers 1
			lease 2s
		}
	}
	reverse_proxy %s`, be.addr())
	startCaddy(t, site, inStorage(storage), onLaggedStorage("0s")) // idle
	port := freePort(t)
	busy, _ := startChild(t, testCaddyfile(storage, port, "", site), port)
	submitJob(t, busy+"/batch", `[{"path":"/hold?id=hold"}]`)
	active := 1
	var perLook []float64
	for _, n := range []int{1, 100, 1000} {
		submitMany(t, busy+"/batch", "j", active, n)
		active = n
		eventually(t, 30*time.Second, fmt.Sprintf("%d jobs held", n), func() bool { return heldIn(storage) == n })
		calls, by := callsPer(t, &thePool(t).looks, 10, "looks")
		t.Logf("%4d active jobs: %.2f storage calls a look (%+v)", n, calls, by)
		perLook = append(perLook, calls)
	}
	// A List of the epochs, a Load of the one heartbeat, a List of the
	// queue; a look under way as counting starts or ends may add a part
	// of one over the 10 looks.
	for i, calls := range perLook {
		if calls > 3.5 {
			t.Errorf("%.2f storage calls a look with %d active jobs; want 3", calls, []int{1, 100, 1000}[i])
		}
	}
	if got := startedOps(be); !slices.Equal(got, []string{"hold"}) || holding(be) != 1 {
		t.Errorf("the idle instance took jobs: %v started, %d held", got, holding(be))
	}
}

// Jobs an older version left listed as active (leased one by one, the
// leases released at a graceful stop) are queued and run by this one.
func TestLegacyActiveJobsMigrated(t *testing.T) {
	setVar(t, &jobsGrace, 50*time.Millisecond)
	be := newBackend(t)
	storage := t.TempDir()
	port := freePort(t)
	cfg := adapt(t, testCaddyfile(storage, port, "", fmt.Sprintf(`
	batch /batch /batch/* {
		async {
			workers 1
			lease 1s
			credentials_key %s
		}
	}
	reverse_proxy %s`, testKey, be.addr())))
	base := loadCaddy(t, cfg, port)
	first := submitJob(t, base+"/batch", `[{"path":"/hold?id=hold"}]`)
	eventually(t, 10*time.Second, "the worker busy", func() bool { return holding(be) == 1 })
	second := submitJob(t, base+"/batch", `[{"path":"/slow?id=second"}]`)
	if err := caddy.Stop(); err != nil { // the first is handed over to the queue
		t.Fatal(err)
	}
	be.release()
	// As the older version stored them: listed as active, their leases
	// released or expired, not queued.
	queued, _ := os.ReadDir(filepath.Join(storage, "batch", "queue"))
	if len(queued) != 2 {
		t.Fatalf("%d jobs queued after the stop, want 2", len(queued))
	}
	for _, e := range queued {
		if err := os.Remove(filepath.Join(storage, "batch", "queue", e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(storage, "batch", "active"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{first, second} {
		if err := os.WriteFile(filepath.Join(storage, "batch", "active", id), []byte(id), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	expired := fmt.Sprintf(`{"instance":"old","expires_at":%q}`, time.Now().Add(-time.Second).Format(time.RFC3339Nano))
	if err := os.WriteFile(filepath.Join(storage, "batch", "jobs", first, "lease"), []byte(expired), 0o600); err != nil {
		t.Fatal(err)
	}

	base = loadCaddy(t, cfg, port)
	for _, id := range []string{first, second} {
		if p := waitJob(t, base+"/batch/"+id, alice, "completed", "error"); p.Get("status").String() != "completed" {
			t.Errorf("job %s: %s", id, p.Raw)
		}
	}
	if left, _ := os.ReadDir(filepath.Join(storage, "batch", "active")); len(left) != 0 {
		t.Errorf("still listed as active: %v", left)
	}
	if _, err := os.Stat(filepath.Join(storage, "batch", "jobs", first, "lease")); !os.IsNotExist(err) {
		t.Errorf("the old lease is left: %v", err)
	}
}
