package batch

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// holdBackend holds every request to /hold until released, logs the
// order in which requests to /op?id= arrive, and answers others at once.
type holdBackend struct {
	*httptest.Server
	release chan struct{}
	once    sync.Once
	mu      sync.Mutex
	held    int
	ops     []string
}

func newHoldBackend(t *testing.T) *holdBackend {
	b := &holdBackend{release: make(chan struct{})}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		if r.URL.Path == "/hold" {
			b.mu.Lock()
			b.held++
			b.mu.Unlock()
			select {
			case <-b.release:
			case <-r.Context().Done():
			}
		} else if r.URL.Path == "/op" {
			b.mu.Lock()
			b.ops = append(b.ops, r.URL.Query().Get("id"))
			b.mu.Unlock()
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{}`)
	}))
	t.Cleanup(b.Close)
	t.Cleanup(b.free) // before Close, which waits for held requests
	return b
}

func (b *holdBackend) free() { b.once.Do(func() { close(b.release) }) }

func (b *holdBackend) holding() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.held
}

func (b *holdBackend) arrived() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.ops)
}

// A job queued on an instance whose workers are all busy is started by an
// instance sharing its storage that has a worker free, while the busy one
// is still busy.
func TestQueuedJobStartsOnIdleInstance(t *testing.T) {
	be := newHoldBackend(t)
	storage := t.TempDir()
	// /pin keeps its jobs where they are taken (no credentials_key: what
	// they inherit stays in memory); /batch's wait in the cluster's queue.
	site := func(port int) string {
		return testCaddyfile(storage, port, "", fmt.Sprintf(`
	batch /pin /pin/* {
		async {
			workers 1
			lease 1s
		}
	}
	batch /batch /batch/* {
		async {
			workers 1
			lease 1s
			credentials_key %s
		}
	}
	reverse_proxy %s`, testKey, be.Listener.Addr()))
	}
	portA, portB := freePort(t), freePort(t)
	a := loadCaddy(t, adapt(t, site(portA)), portA)
	b, _ := startChild(t, site(portB), portB)

	// The child's one worker runs a job only it can run.
	submitJob(t, b+"/pin", `[{"path":"/hold"}]`)
	eventually(t, 10*time.Second, "the child's worker busy", func() bool { return be.holding() == 1 })
	start := time.Now()
	id := submitJob(t, b+"/batch", `[{"path":"/op?id=queued"}]`)
	p := waitJob(t, a+"/batch/"+id, alice, "completed", "error")
	waited := time.Since(start)
	if p.Get("status").String() != "completed" || !slices.Equal(be.arrived(), []string{"queued"}) {
		t.Fatalf("the queued job: %s; the backend saw %v", p.Raw, be.arrived())
	}
	// Still held: the job did not wait for the child's worker.
	if be.holding() != 1 {
		t.Fatalf("%d requests held", be.holding())
	}
	t.Logf("the job queued on the busy instance ended %v after it was submitted", waited.Round(time.Millisecond))
}

// Jobs waiting are started in a round over their owners, not first come
// first served, and each owner's jobs in the order they were submitted.
func TestOwnersServedInTurn(t *testing.T) {
	be := newHoldBackend(t)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch /batch/* {
		async {
			workers 1
			credentials_key %s
		}
	}
	reverse_proxy %s`, testKey, be.Listener.Addr()))
	submit := func(owner, body string) {
		t.Helper()
		status, _, resp := send(t, "POST", base+"/batch", body, "Authorization: Bearer "+owner, "Prefer: respond-async")
		if status != 202 {
			t.Fatalf("submit %s: %d %s", body, status, resp)
		}
	}
	submit("z", `[{"path":"/hold"}]`)
	eventually(t, 10*time.Second, "the worker busy", func() bool { return be.holding() == 1 })
	// First come, first served would run all of a's before b's and c's.
	for _, op := range []string{"a1", "a2", "a3", "b1", "b2", "c1"} {
		submit(op[:1], `[{"path":"/op?id=`+op+`"}]`)
	}
	be.free()
	eventually(t, 20*time.Second, "every job run", func() bool { return len(be.arrived()) == 6 })
	got := be.arrived()
	t.Logf("started in the order %v", got)
	// A round of one job of each owner, then of each owner with jobs
	// left, each in the order the first round took, each owner's jobs in
	// the order they came.
	at := 0
	var turns []byte
	for k, round := range [][]string{{"a1", "b1", "c1"}, {"a2", "b2"}, {"a3"}} {
		part := got[at : at+len(round)]
		at += len(round)
		sorted := slices.Sorted(slices.Values(part))
		if !slices.Equal(sorted, round) {
			t.Fatalf("round %d started %v, want %v in some order (all: %v)", k, part, round, got)
		}
		if k == 0 {
			turns = ownersOf(part)
			continue
		}
		var want []byte
		for _, o := range turns {
			if slices.Contains(ownersOf(part), o) {
				want = append(want, o)
			}
		}
		if !slices.Equal(ownersOf(part), want) {
			t.Errorf("round %d served the owners %s, after %s in the first (all: %v)", k, ownersOf(part), turns, got)
		}
	}
}

func ownersOf(ops []string) []byte {
	var o []byte
	for _, op := range ops {
		o = append(o, op[0])
	}
	return o
}

// max_queued bounds the jobs one instance has taken that wait, also when
// they wait in the cluster's queue: beyond, 503 and Retry-After; once
// another instance has taken one, there is room again.
func TestMaxQueuedCountsClusterQueue(t *testing.T) {
	setVar(t, &jobsGrace, 50*time.Millisecond) // the job held at the end is handed over
	be := newHoldBackend(t)
	storage := t.TempDir()
	site := func(port int) string {
		return testCaddyfile(storage, port, "", fmt.Sprintf(`
	batch /batch /batch/* {
		async {
			workers 1
			max_queued 2
			lease 1s
			credentials_key %s
		}
	}
	reverse_proxy %s`, testKey, be.Listener.Addr()))
	}
	port := freePort(t)
	base := loadCaddy(t, adapt(t, site(port)), port)
	submitJob(t, base+"/batch", `[{"path":"/hold"}]`)
	eventually(t, 10*time.Second, "the worker busy", func() bool { return be.holding() == 1 })
	submitJob(t, base+"/batch", `[{"path":"/hold"}]`)
	submitJob(t, base+"/batch", `[{"path":"/op?id=third"}]`)
	status, hdr, body := send(t, "POST", base+"/batch", `[{"path":"/op?id=refused"}]`, alice, "Prefer: respond-async")
	if status != 503 || hdr.Get("Retry-After") == "" {
		t.Fatalf("a third job waiting: %d %v %s", status, hdr, body)
	}
	// Another instance takes the oldest waiting, and is busy with it.
	portB := freePort(t)
	startChild(t, site(portB), portB)
	eventually(t, 10*time.Second, "the other instance busy", func() bool { return be.holding() == 2 })
	eventually(t, 10*time.Second, "room in the queue again", func() bool {
		status, _, _ := send(t, "POST", base+"/batch", `[{"path":"/op?id=fourth"}]`, alice, "Prefer: respond-async")
		return status == 202
	})
}

// Jobs an older version left listed as active (leased one by one, the
// leases released at a graceful stop) are queued and run by this one.
func TestLegacyActiveJobsMigrated(t *testing.T) {
	setVar(t, &jobsGrace, 50*time.Millisecond)
	be := newHoldBackend(t)
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
	reverse_proxy %s`, testKey, be.Listener.Addr())))
	base := loadCaddy(t, cfg, port)
	first := submitJob(t, base+"/batch", `[{"path":"/hold"}]`)
	eventually(t, 10*time.Second, "the worker busy", func() bool { return be.holding() == 1 })
	second := submitJob(t, base+"/batch", `[{"path":"/op?id=second"}]`)
	if err := caddy.Stop(); err != nil { // the first is handed over to the queue
		t.Fatal(err)
	}
	be.free()
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
