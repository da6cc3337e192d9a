package batch

import (
	"sync"
	"testing"
)

func TestIdempotencyKey(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	batch := `[{"method":"POST","path":"/users","body":{"name":"Once"}}]`

	status, _, first := post(t, base+"/batch", batch, alice, "Idempotency-Key: k1")
	if status != 200 {
		t.Fatalf("%d %s", status, first)
	}
	status, hdr, again := post(t, base+"/batch", batch, alice, "Idempotency-Key: k1")
	if status != 200 || again != first || hdr.Get("Idempotent-Replayed") != "true" {
		t.Errorf("replay: %d %q %s, want %s", status, hdr.Get("Idempotent-Replayed"), again, first)
	}
	if be.API.Len() != 1 {
		t.Errorf("the batch ran %d times", be.API.Len())
	}
	status, _, body := post(t, base+"/batch", `[{"method":"POST","path":"/users","body":{"name":"Other"}}]`, alice, "Idempotency-Key: k1")
	if status != 422 {
		t.Errorf("same key, other body: %d %s", status, body)
	}
	// Keys belong to their owner.
	if status, hdr, _ := post(t, base+"/batch", batch, "Authorization: Bearer bob", "Idempotency-Key: k1"); status != 200 || hdr.Get("Idempotent-Replayed") != "" {
		t.Errorf("another owner's key: %d replayed %q", status, hdr.Get("Idempotent-Replayed"))
	}
	if be.API.Len() != 2 {
		t.Errorf("backend holds %d users, want 2", be.API.Len())
	}

	// Async: the repeat gets the same job.
	status, hdr1, body1 := post(t, base+"/batch", `[{"path":"/health"}]`, alice, "Prefer: respond-async", "Idempotency-Key: k2")
	status2, hdr2, body2 := post(t, base+"/batch", `[{"path":"/health"}]`, alice, "Prefer: respond-async", "Idempotency-Key: k2")
	id := mustJSON(t, body1).Get("id").String()
	if status != 202 || status2 != 202 || mustJSON(t, body2).Get("id").String() != id || hdr1.Get("Location") != hdr2.Get("Location") || hdr2.Get("Location") == "" {
		t.Errorf("async replay: %d %s / %d %s", status, body1, status2, body2)
	}
	waitJob(t, base+"/batch/"+id, alice, "completed")
}

// Twenty identical submissions at once run the batch once.
func TestIdempotencyConcurrent(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	var wg sync.WaitGroup
	bodies := make([]string, 20)
	statuses := make([]int, 20)
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			statuses[i], _, bodies[i] = post(t, base+"/batch", `[{"method":"POST","path":"/users","body":{"name":"Dup"}},{"path":"/slow?d=50ms"}]`, alice, "Idempotency-Key: same")
		}()
	}
	wg.Wait()
	for i := range 20 {
		if statuses[i] != 200 || bodies[i] != bodies[0] {
			t.Errorf("submission %d: %d %s, want %s", i, statuses[i], bodies[i], bodies[0])
		}
	}
	if be.API.Len() != 1 {
		t.Errorf("20 submissions with one key created %d users", be.API.Len())
	}
}

// Keys hold across instances sharing storage.
func TestIdempotencyAcrossInstances(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	site := func(port int) string {
		return testCaddyfile(storage, port, "", "batch /batch\nreverse_proxy "+be.addr())
	}
	portA, portB := freePort(t), freePort(t)
	a := loadCaddy(t, adapt(t, site(portA)), portA)
	b := startChildCaddy(t, site(portB), portB)
	batch := `[{"method":"POST","path":"/users","body":{"name":"Across"}}]`
	_, _, first := post(t, a+"/batch", batch, alice, "Idempotency-Key: x")
	status, hdr, again := post(t, b+"/batch", batch, alice, "Idempotency-Key: x")
	if status != 200 || again != first || hdr.Get("Idempotent-Replayed") != "true" || be.API.Len() != 1 {
		t.Errorf("replay on the other instance: %d %s (users %d)", status, again, be.API.Len())
	}
}
