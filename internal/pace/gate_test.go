package pace

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// eventually waits up to d for cond, failing the test with what.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// The budget's turns go round-robin between batches: a small batch that
// comes while a large one waits is not served after all of it.
func TestGateFairBetweenOwners(t *testing.T) {
	g := NewGate(1, nil)
	big, small := &Owner{}, &Owner{}
	ctx := context.Background()
	hold, err := g.Acquire(ctx, big)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var order []string
	var wg sync.WaitGroup
	wait := func(o *Owner, name string, n int) {
		for range n {
			wg.Go(func() {
				tk, err := g.Acquire(ctx, o)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				order = append(order, name)
				mu.Unlock()
				g.Release(tk, 0, nil)
			})
		}
		eventually(t, 5*time.Second, "waiters queued", func() bool {
			g.mu.Lock()
			defer g.mu.Unlock()
			return len(o.waiters) == n
		})
	}
	wait(big, "big", 10)
	wait(small, "small", 2)
	g.Release(hold, 0, nil)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("not within 5s: every waiter to get its turn")
	}
	if len(order) != 12 {
		t.Fatalf("order %v", order)
	}
	// Turns alternate while both wait: small's two are among the first four.
	n := 0
	for _, o := range order[:4] {
		if o == "small" {
			n++
		}
	}
	if n != 2 {
		t.Errorf("small batch waited behind the large one: %v", order)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.used != 0 || len(g.ring) != 0 {
		t.Errorf("after all: used %d, ring %d", g.used, len(g.ring))
	}
}

// A waiter whose time runs out leaves the queue and takes no turn.
func TestGateWaitTimesOut(t *testing.T) {
	g := NewGate(1, nil)
	o := &Owner{}
	hold, err := g.Acquire(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := g.Acquire(ctx, o); err != ErrNoTurn {
		t.Fatalf("acquire with the budget spent: %v", err)
	}
	g.Release(hold, 0, nil)
	g.mu.Lock()
	used, ring := g.used, len(g.ring)
	g.mu.Unlock()
	if used != 0 || ring != 0 {
		t.Errorf("after a timed-out waiter: used %d, ring %d", used, ring)
	}
	if tk, err := g.Acquire(context.Background(), o); err != nil {
		t.Errorf("budget not given back: %v", err)
	} else {
		g.Release(tk, 0, nil)
	}
}

// A keyed rate keeps at most its bound of buckets, whatever keys come:
// idle ones are dropped, and keys beyond the bound share one bucket, so
// that new keys gain no quota.
func TestRateKeysBounded(t *testing.T) {
	r := newRateKeys(2, time.Second, 100)
	now := time.Unix(1000, 0)
	for i := range 10000 {
		key := "tenant-" + strconv.Itoa(i)
		if ok, _ := r.allows(key, now); ok {
			r.take(key, now)
		}
	}
	if len(r.buckets) != 100 {
		t.Fatalf("%d buckets, want the bound 100", len(r.buckets))
	}
	// Keys 100 on shared the overflow: its 2 tokens, then none.
	if ok, at := r.allows("tenant-new", now); ok || !at.After(now) {
		t.Errorf("an overflow key has quota left: %v %v", ok, at)
	}
	// A key with its own bucket keeps it.
	if ok, _ := r.allows("tenant-0", now); !ok {
		t.Error("tenant-0 lost its token")
	}
	// Idle buckets are dropped once full again: new keys get their own.
	later := now.Add(2 * time.Second)
	if ok, _ := r.allows("tenant-new", later); !ok {
		t.Error("no room for a new key after the others went idle")
	}
	if len(r.buckets) > 100 {
		t.Errorf("%d buckets", len(r.buckets))
	}
	r.take("tenant-new", later)
	// A long key is kept hashed.
	long := strings.Repeat("k", 1<<16)
	r.allows(long, later)
	for k := range r.buckets {
		if len(k) > maxRateKeyLen {
			t.Errorf("a key of %d bytes kept", len(k))
		}
	}
	// Refill: a bucket emptied gets a token back after interval/n.
	b := newRateKeys(2, time.Second, 10)
	b.take("a", now)
	b.take("a", now)
	if ok, at := b.allows("a", now); ok || at != now.Add(500*time.Millisecond) {
		t.Errorf("empty bucket: %v, next token at %v", ok, at.Sub(now))
	}
	if ok, _ := b.allows("a", now.Add(500*time.Millisecond)); !ok {
		t.Error("no token after interval/n")
	}
}

// Pacers are kept per key up to a bound: idle ones are dropped, keys
// beyond share one, and a long key is kept hashed.
func TestPacersBounded(t *testing.T) {
	var ps pacers
	now := time.Unix(1000, 0)
	for i := range maxPacers + 500 {
		ps.of("caller-"+strconv.Itoa(i), now)
	}
	if len(ps.m) != maxPacers {
		t.Fatalf("%d pacers, want the bound %d", len(ps.m), maxPacers)
	}
	if p := ps.of("one-more", now); p != &ps.overflow {
		t.Error("a key past the bound has a pacer of its own")
	}
	held := ps.of("caller-1", now)
	held.inflight = 1
	later := now.Add(idlePacer + 2*time.Second)
	if p := ps.of("after-they-idled", later); p == &ps.overflow {
		t.Error("no room made by idle pacers")
	}
	if ps.of("caller-1", later) != held {
		t.Error("a pacer with operations in flight was dropped")
	}
	ps.of(strings.Repeat("k", 1<<16), later)
	for k := range ps.m {
		if len(k) > maxRateKeyLen {
			t.Errorf("a key of %d bytes kept", len(k))
		}
	}
}
