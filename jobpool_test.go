package batch

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

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
