// Package pace orders the operations a batch handler sends downstream:
// the budget of operations in flight, rates that operations wait for,
// and the pacer that learns an API's rate from its answers.
package pace

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"sync"
	"time"
)

// Bounds of pacing.
const (
	// maxPause caps the pause one answer may ask for (Retry-After,
	// RateLimit reset): no answer holds every operation longer.
	maxPause = 60 * time.Second
	// defaultPause is the pause of a 429 that says nothing of when to
	// come back.
	defaultPause = time.Second
	// MaxAdaptiveAttempts bounds the tries of an adaptive operation
	// answered 429; op_timeout bounds them first in practice.
	MaxAdaptiveAttempts = 20
	// maxRateKeys bounds the keyed buckets of a rate; keys beyond it
	// share one bucket.
	maxRateKeys = 10000
	// maxRateKeyLen is the longest key kept as it is; longer ones are
	// hashed.
	maxRateKeyLen = 128
)

// Owner is who operations wait as: one batch or job. Its waiters
// are the gate's to order, under the gate's lock.
type Owner struct {
	// Adaptive operations are paced by what the API's answers say.
	Adaptive bool
	// Key names the bucket of the rate the owner's operations take.
	Key string
	// PaceKey names the pacer of adaptive operations: the caller and the
	// API they go to, whose limits are usually the caller's own.
	PaceKey string

	waiters []*waiter
	queued  bool // in the gate's ring
}

type waiter struct {
	ready   chan struct{}
	granted bool
	turn    Turn
}

// Turn is an operation's hold on the gate, from Acquire to Release.
type Turn struct {
	pacer     *pacer // of an adaptive owner
	grantedAt time.Time
}

// Gate orders the operations of one handler downstream.
// Every operation a handler sends downstream, of every batch and job,
// first takes a turn from the handler's gate. The gate holds:
//
//   - the budget, max_inflight operations in flight at once;
//   - the rate, a token bucket per key that operations wait for;
//   - the pacer, for adaptive operations (async jobs always; sync batches
//     with "pacing adaptive", see pacer.go): the rate it learns from the
//     API's 429s, the pauses they ask for, and the quota that RateLimit
//     headers advertise, spread over its reset window.
//
// Operations wait for their turn within their op_timeout; the gate answers
// waiters round-robin between their batches (owners), so a job of a
// million operations does not starve a batch of ten. A gate belongs to one
// handler instance: a config reload makes a new handler and a new gate, and
// operations of the old config in flight count against the old one.
type Gate struct {
	max   int
	rate  *rateKeys // nil without a rate
	mu    sync.Mutex
	used  int         // operations in flight
	ring  []*Owner    // owners with waiters, served round-robin
	next  int         // where the ring's next turn starts
	timer *time.Timer // wakes waiters that wait for a time
	armed time.Time   // when timer fires; zero when it does not

	pacers pacers // of adaptive operations, by Owner.PaceKey
}

// Rate is a rate operations wait for: a token bucket of Requests
// tokens, refilled at Requests per Interval, one per Owner.Key.
type Rate struct {
	Requests int
	Interval time.Duration
}

// NewGate returns a gate of maxInflight operations in flight at once,
// with rate, if not nil, for operations to wait for.
func NewGate(maxInflight int, rate *Rate) *Gate {
	g := &Gate{max: maxInflight}
	if rate != nil {
		g.rate = newRateKeys(rate.Requests, rate.Interval, maxRateKeys)
	}
	return g
}

// ErrNoTurn is why an operation did not start: its time ran out waiting
// for a turn.
var ErrNoTurn = errors.New("no turn before the deadline")

// Acquire waits for a turn for o within ctx.
func (g *Gate) Acquire(ctx context.Context, o *Owner) (Turn, error) {
	now := time.Now()
	g.mu.Lock()
	if len(g.ring) == 0 {
		if ok, _ := g.admissible(o, now); ok {
			t := g.take(o, now)
			g.mu.Unlock()
			return t, nil
		}
	}
	w := &waiter{ready: make(chan struct{})}
	o.waiters = append(o.waiters, w)
	if !o.queued {
		o.queued = true
		g.ring = append(g.ring, o)
	}
	g.dispatch(now)
	g.mu.Unlock()

	select {
	case <-w.ready:
		return w.turn, nil
	case <-ctx.Done():
	}
	g.mu.Lock()
	if w.granted {
		// Granted as ctx ended: the turn goes to the next.
		g.mu.Unlock()
		g.Release(w.turn, 0, nil)
		return Turn{}, ErrNoTurn
	}
	if i := slices.Index(o.waiters, w); i >= 0 {
		o.waiters = slices.Delete(o.waiters, i, i+1)
	}
	if len(o.waiters) == 0 {
		g.unqueue(o)
	}
	g.mu.Unlock()
	return Turn{}, ErrNoTurn
}

// Report is what an answer changed of the pacer: Event (EventPaused,
// EventSlowed, or "" for nothing to count), and the rate and pause after
// it.
type Report struct {
	Event  string
	Rate   float64
	Paused time.Duration
}

// Release ends t. For an adaptive operation, the status and headers of
// its answer (status 0 for none) feed the pacer, and what that changed is
// reported.
func (g *Gate) Release(t Turn, status int, h http.Header) (r Report) {
	now := time.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	g.used--
	if p := t.pacer; p != nil {
		r.Event = p.learn(t.grantedAt, status, h, now)
		r.Rate, r.Paused = p.rate, max(p.pausedUntil.Sub(now), 0)
	}
	g.dispatch(now)
	return r
}

// admissible reports whether an operation of o may start now; if not
// until some time, at says when.
func (g *Gate) admissible(o *Owner, now time.Time) (ok bool, at time.Time) {
	if g.used >= g.max {
		return false, time.Time{}
	}
	if o.Adaptive {
		if ok, at := g.pacers.of(o.PaceKey, now).admit(now, g.max); !ok {
			return false, at
		}
	}
	if g.rate != nil {
		if ok, at := g.rate.allows(o.Key, now); !ok {
			return false, at
		}
	}
	return true, time.Time{}
}

// take gives o a turn that admissible allowed.
func (g *Gate) take(o *Owner, now time.Time) Turn {
	g.used++
	t := Turn{grantedAt: now}
	if o.Adaptive {
		t.pacer = g.pacers.of(o.PaceKey, now)
		t.pacer.start(now, g.max)
	}
	if g.rate != nil {
		g.rate.take(o.Key, now)
	}
	return t
}

// dispatch gives turns to waiters, round-robin between owners, while
// some may start; and if some wait for a time, wakes them then.
func (g *Gate) dispatch(now time.Time) {
	var wake time.Time
	for g.used < g.max && len(g.ring) > 0 {
		wake = time.Time{}
		granted := false
		for i := range len(g.ring) {
			idx := (g.next + i) % len(g.ring)
			o := g.ring[idx]
			ok, at := g.admissible(o, now)
			if !ok {
				if !at.IsZero() && (wake.IsZero() || at.Before(wake)) {
					wake = at
				}
				continue
			}
			t := g.take(o, now)
			w := o.waiters[0]
			o.waiters[0] = nil
			o.waiters = o.waiters[1:]
			w.granted, w.turn = true, t
			close(w.ready)
			g.next = idx + 1
			if len(o.waiters) == 0 {
				g.unqueue(o)
			}
			granted = true
			break
		}
		if !granted {
			break
		}
	}
	if g.used < g.max && !wake.IsZero() && (g.armed.IsZero() || wake.Before(g.armed)) {
		g.armed = wake
		if g.timer == nil {
			g.timer = time.AfterFunc(wake.Sub(now), g.wake)
		} else {
			g.timer.Reset(wake.Sub(now))
		}
	}
}

// wake is the timer's: the time some waited for has come.
func (g *Gate) wake() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.armed = time.Time{}
	g.dispatch(time.Now())
}

// unqueue takes o, which has no waiters left, out of the ring.
func (g *Gate) unqueue(o *Owner) {
	o.queued = false
	o.waiters = nil
	i := slices.Index(g.ring, o)
	if i < 0 {
		return
	}
	g.ring = slices.Delete(g.ring, i, i+1)
	if g.next > i {
		g.next--
	}
	if g.next >= len(g.ring) {
		g.next = 0
	}
}

// adaptiveBackoff is the least wait before try attempt+1 of an adaptive
// operation answered 429, whatever the pause: an API that answers 429
// with Retry-After: 0 is not asked again at once. It grows to a second,
// no more: the pacer spaces the starts, and an operation refused often
// (an instance that came late to a quota others hold) must not fall
// ever further behind.
func adaptiveBackoff(attempt int) time.Duration {
	return min(100*time.Millisecond<<min(max(attempt-1, 0), 10), maxBackoff)
}

// maxBackoff bounds adaptiveBackoff.
const maxBackoff = time.Second
