package batch

import (
	"fmt"
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
