package batch

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/tidwall/gjson"
)

// A job whose window passed while it waited for a worker never sends an
// operation: it ends expired, each operation skipped, and its results stay
// readable. The queue's sweep ends it at once, outside the workers, even
// while another job holds the only one.
func TestAsyncWindowPassedInQueueSendsNothing(t *testing.T) {
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
			retention 1h
			window 1s
			workers 1
		}
	}
	reverse_proxy %s`, be.addr()), inStorage(storage))
	// The long job holds the one worker while the clock goes past the
	// short job's window.
	long := submitJob(t, base+"/long", "["+strings.TrimSuffix(strings.Repeat(`{"path":"/slow?d=50ms&id=a"},`, 200), ",")+"]")
	eventually(t, 10*time.Second, "the long job running", func() bool { return len(be.eventLog()) > 0 })
	id := submitJob(t, base+"/short", `[{"path":"/slow?d=1ms&id=b"},{"path":"/slow?d=1ms&id=c"}]`)
	ahead(2 * time.Second) // past the short job's window, while it waits
	thePool(t).sweepQueue()
	p := waitJob(t, base+"/short/"+id, alice, stateExpired, stateCompleted, stateError)
	if p.Get("status").String() != stateExpired || p.Get("skipped").Int() != 2 || p.Get("completed").Int() != 2 {
		t.Errorf("a job whose window passed in the queue: %s", p.Raw)
	}
	if lp := waitJob(t, base+"/long/"+long, alice, stateRunning, stateCompleted); lp.Get("status").String() != stateRunning {
		t.Errorf("the expired job waited for the long one: %s", lp.Raw)
	}
	for _, e := range be.eventLog() {
		if e == "start b" || e == "start c" {
			t.Errorf("the job sent an operation after its window: %v", be.eventLog())
		}
	}
	_, _, body := send(t, "GET", base+"/short/"+id+"/results", "", alice)
	res := mustJSON(t, body)
	if r := res.Get("results.1"); len(res.Get("results").Array()) != 2 || r.Get("status").Int() != 424 || r.Get("error").String() != errWindowSkip ||
		res.Get("status").String() != statusExpired {
		t.Errorf("results of the expired job: %s", body)
	}
	if status, _, body := send(t, "DELETE", base+"/long/"+long, "", alice); status != 200 && status != 202 {
		t.Fatalf("cancel of the long job: %d %s", status, body)
	}
	waitJob(t, base+"/long/"+long, alice, "canceled")
}

// So does a job that any instance can run, waiting in the cluster's queue
// in storage: the look at the queue runs it, sending nothing, while the
// only worker is busy.
func TestAsyncWindowPassedInClusterQueueSendsNothing(t *testing.T) {
	ahead := skewClock(t)
	be := newBackend(t)
	t.Cleanup(be.release)
	storage := t.TempDir()
	base := startCaddy(t, fmt.Sprintf(`
	batch /long /long/* {
		async {
			workers 1
			credentials_key %[2]s
			lease 1s
		}
	}
	batch /short /short/* {
		async {
			window 1s
			workers 1
			credentials_key %[2]s
			lease 1s
		}
	}
	reverse_proxy %[1]s`, be.addr(), testKey), inStorage(storage))
	long := submitJob(t, base+"/long", `[{"path":"/hold?id=a"}]`)
	eventually(t, 10*time.Second, "the long job running", func() bool { return slices.Contains(be.eventLog(), "start a") })
	id := submitJob(t, base+"/short", `[{"path":"/slow?d=1ms&id=b"},{"path":"/slow?d=1ms&id=c"}]`)
	if keys, _ := filepath.Glob(filepath.Join(storage, "batch", "queue", "*"+id)); len(keys) != 1 {
		t.Fatalf("the job is not in the cluster's queue: %v", keys)
	}
	ahead(2 * time.Second)
	p := waitJob(t, base+"/short/"+id, alice, stateExpired, stateCompleted, stateError)
	if p.Get("status").String() != stateExpired || p.Get("skipped").Int() != 2 {
		t.Errorf("a job whose window passed in the cluster's queue: %s", p.Raw)
	}
	if lp := waitJob(t, base+"/long/"+long, alice, stateRunning, stateCompleted); lp.Get("status").String() != stateRunning {
		t.Errorf("the expired job waited for the long one: %s", lp.Raw)
	}
	if log := be.eventLog(); slices.Contains(log, "start b") || slices.Contains(log, "start c") {
		t.Errorf("the job sent an operation after its window: %v", log)
	}
	if _, _, body := send(t, "GET", base+"/short/"+id+"/results", "", alice); gjson.Get(body, "results.0.error").String() != errWindowSkip {
		t.Errorf("results: %s", body)
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
