package batch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

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

// Defaults and bounds of pacing.
const (
	defaultMaxInflight = 32
	// maxPause caps the pause one answer may ask for (Retry-After,
	// RateLimit reset): no answer holds every operation longer.
	maxPause = 60 * time.Second
	// defaultPause is the pause of a 429 that says nothing of when to
	// come back.
	defaultPause = time.Second
	// maxAdaptiveAttempts bounds the tries of an adaptive operation
	// answered 429; op_timeout bounds them first in practice.
	maxAdaptiveAttempts = 20
	// maxRateKeys bounds the keyed buckets of a rate; keys beyond it
	// share one bucket.
	maxRateKeys = 10000
	// maxRateKeyLen is the longest key kept as it is; longer ones are
	// hashed.
	maxRateKeyLen = 128
)

// Values of the pacing option.
const (
	pacingAdaptive = "adaptive"
	pacingOff      = "off"
)

// RateConfig is a rate that operations wait for: a token bucket of
// requests tokens, refilled at requests per interval.
type RateConfig struct {
	// How many operations may start per interval; also the burst allowed
	// after a quiet spell. Required, at least 1.
	Requests int `json:"requests,omitempty"`

	// The interval requests are counted over. Required, positive.
	Interval caddy.Duration `json:"interval,omitempty"`

	// A placeholder that gives each value its own bucket, resolved with
	// the batch request (for async jobs, with the connection facts and
	// inherited headers they keep), such as
	// {http.request.header.X-Tenant}. At most 10,000 keys are kept; idle
	// ones are dropped, and keys beyond the bound share one bucket.
	// Default: one bucket for all.
	Key string `json:"key,omitempty"`
}

func (rc *RateConfig) validate() error {
	switch {
	case rc.Requests < 1:
		return fmt.Errorf("rate: requests must be at least 1, got %d", rc.Requests)
	case rc.Interval <= 0:
		return fmt.Errorf("rate: interval must be positive, got %s", time.Duration(rc.Interval))
	}
	return nil
}

// paceOwner is who operations wait as: one batch or job. Its waiters
// are the gate's to order, under the gate's lock.
type paceOwner struct {
	adaptive bool
	key      string // of the rate bucket
	waiters  []*waiter
	queued   bool // in the gate's ring
}

type waiter struct {
	ready     chan struct{}
	granted   bool
	grantedAt time.Time
}

// turn is an operation's hold on the gate, from acquire to release.
type turn struct {
	owner     *paceOwner
	grantedAt time.Time
}

// gate orders the operations of one handler downstream.
type gate struct {
	max   int
	rate  *rateKeys // nil without a rate
	mu    sync.Mutex
	used  int          // operations in flight
	ring  []*paceOwner // owners with waiters, served round-robin
	next  int          // where the ring's next turn starts
	timer *time.Timer  // wakes waiters that wait for a time
	armed time.Time    // when timer fires; zero when it does not

	pacer pacer // of adaptive operations
}

func newGate(maxInflight int, rc *RateConfig) *gate {
	g := &gate{max: maxInflight}
	if rc != nil {
		g.rate = newRateKeys(rc.Requests, time.Duration(rc.Interval), maxRateKeys)
	}
	return g
}

// errNoTurn is why an operation did not start: its time ran out waiting
// for a turn.
var errNoTurn = errors.New("no turn before the deadline")

// acquire waits for a turn for owner within ctx.
func (g *gate) acquire(ctx context.Context, o *paceOwner) (turn, error) {
	now := time.Now()
	g.mu.Lock()
	if len(g.ring) == 0 {
		if ok, _ := g.admissible(o, now); ok {
			g.take(o, now)
			g.mu.Unlock()
			return turn{owner: o, grantedAt: now}, nil
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
		return turn{owner: o, grantedAt: w.grantedAt}, nil
	case <-ctx.Done():
	}
	g.mu.Lock()
	if w.granted {
		// Granted as ctx ended: the turn goes to the next.
		g.mu.Unlock()
		g.release(turn{owner: o, grantedAt: w.grantedAt}, 0, nil)
		return turn{}, errNoTurn
	}
	if i := slices.Index(o.waiters, w); i >= 0 {
		o.waiters = slices.Delete(o.waiters, i, i+1)
	}
	if len(o.waiters) == 0 {
		g.unqueue(o)
	}
	g.mu.Unlock()
	return turn{}, errNoTurn
}

// paceReport is what an answer changed of the pacer: event (see learn),
// and the rate and pause after it.
type paceReport struct {
	event  string
	rate   float64
	paused time.Duration
}

// release ends t. For an adaptive operation, the status and headers of
// its answer (status 0 for none) feed the pacer, and what that changed is
// reported.
func (g *gate) release(t turn, status int, h http.Header) (r paceReport) {
	now := time.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	g.used--
	if t.owner.adaptive {
		r.event = g.pacer.learn(t.grantedAt, status, h, now)
		r.rate, r.paused = g.pacer.rate, max(g.pacer.pausedUntil.Sub(now), 0)
	}
	g.dispatch(now)
	return r
}

// admissible reports whether an operation of o may start now; if not
// until some time, at says when.
func (g *gate) admissible(o *paceOwner, now time.Time) (ok bool, at time.Time) {
	if g.used >= g.max {
		return false, time.Time{}
	}
	if o.adaptive {
		if ok, at := g.pacer.admit(now, g.max); !ok {
			return false, at
		}
	}
	if g.rate != nil {
		if ok, at := g.rate.allows(o.key, now); !ok {
			return false, at
		}
	}
	return true, time.Time{}
}

// take gives o a turn that admissible allowed.
func (g *gate) take(o *paceOwner, now time.Time) {
	g.used++
	if o.adaptive {
		g.pacer.start(now, g.max)
	}
	if g.rate != nil {
		g.rate.take(o.key, now)
	}
}

// dispatch gives turns to waiters, round-robin between owners, while
// some may start; and if some wait for a time, wakes them then.
func (g *gate) dispatch(now time.Time) {
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
			g.take(o, now)
			w := o.waiters[0]
			o.waiters[0] = nil
			o.waiters = o.waiters[1:]
			w.granted, w.grantedAt = true, now
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
func (g *gate) wake() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.armed = time.Time{}
	g.dispatch(time.Now())
}

// unqueue takes o, which has no waiters left, out of the ring.
func (g *gate) unqueue(o *paceOwner) {
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

// rateKeys are the token buckets of a rate, by key: at most max of them,
// those of keys beyond sharing one.
type rateKeys struct {
	n        float64       // tokens a bucket holds, and gains per interval
	interval time.Duration // of the refill
	max      int
	buckets  map[string]*bucket
	overflow bucket // of keys beyond max
	swept    time.Time
}

type bucket struct {
	tokens float64
	at     time.Time // when tokens was counted
}

func newRateKeys(n int, interval time.Duration, maxKeys int) *rateKeys {
	return &rateKeys{n: float64(n), interval: interval, max: maxKeys, buckets: make(map[string]*bucket)}
}

// refill brings b's tokens to now, perSec more a second, up to capacity.
func (b *bucket) refill(now time.Time, perSec, capacity float64) {
	if d := now.Sub(b.at); d > 0 {
		b.tokens = min(capacity, b.tokens+perSec*d.Seconds())
		b.at = now
	}
}

// next is when b, refilled at perSec a second, has a token: a
// millisecond from now at least.
func (b *bucket) next(now time.Time, perSec float64) time.Time {
	wait := time.Duration((1 - b.tokens) / perSec * float64(time.Second))
	return now.Add(max(wait, time.Millisecond))
}

// perSec is the refill of the rate's buckets.
func (r *rateKeys) perSec() float64 { return r.n / r.interval.Seconds() }

// fill brings b's count of tokens to now; a new bucket is full.
func (r *rateKeys) fill(b *bucket, now time.Time) {
	if b.at.IsZero() {
		b.tokens, b.at = r.n, now
		return
	}
	b.refill(now, r.perSec(), r.n)
}

// bucket returns the bucket of key, making one if there is room: a full
// map drops its idle buckets (full again, so no different from new ones)
// at most once an interval, and otherwise sends new keys to the overflow.
func (r *rateKeys) bucket(key string, now time.Time) *bucket {
	if len(key) > maxRateKeyLen {
		sum := sha256.Sum256([]byte(key))
		key = hex.EncodeToString(sum[:16])
	}
	if b, ok := r.buckets[key]; ok {
		return b
	}
	if len(r.buckets) >= r.max && now.Sub(r.swept) >= r.interval {
		r.swept = now
		for k, b := range r.buckets {
			if r.fill(b, now); b.tokens >= r.n {
				delete(r.buckets, k)
			}
		}
	}
	if len(r.buckets) >= r.max {
		return &r.overflow
	}
	b := new(bucket)
	r.buckets[key] = b
	return b
}

// allows reports whether key has a token now, or when it will.
func (r *rateKeys) allows(key string, now time.Time) (bool, time.Time) {
	b := r.bucket(key, now)
	r.fill(b, now)
	if b.tokens >= 1 {
		return true, time.Time{}
	}
	return false, b.next(now, r.perSec())
}

// take spends a token of key, which allows said it has.
func (r *rateKeys) take(key string, now time.Time) {
	b := r.bucket(key, now)
	r.fill(b, now)
	b.tokens--
}

// paceOwner returns who the runner's operations wait as. A batch's is set
// as it starts; a job's is made at its first operation, adaptive.
func (rn *runner) paceOwner() *paceOwner {
	rn.paceOnce.Do(func() {
		if rn.pace == nil {
			rn.pace = &paceOwner{adaptive: true, key: rn.h.jobRateKey(rn)}
		}
	})
	return rn.pace
}

// batchPaceOwner is who the operations of a batch sent in r wait as.
func (h *Handler) batchPaceOwner(r *http.Request) *paceOwner {
	o := &paceOwner{adaptive: h.Pacing == pacingAdaptive}
	if h.Rate != nil && h.Rate.Key != "" {
		if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
			o.key = repl.ReplaceAll(h.Rate.Key, "")
		}
	}
	return o
}

// jobRateKey resolves the rate key for a job, which has no request: a
// stand-in with the connection facts and inherited headers it keeps.
func (h *Handler) jobRateKey(rn *runner) string {
	if h.Rate == nil || h.Rate.Key == "" {
		return ""
	}
	c := &rn.conn
	req := &http.Request{
		Method: http.MethodPost, URL: &url.URL{Path: c.path}, Proto: c.proto,
		ProtoMajor: c.protoMajor, ProtoMinor: c.protoMinor, Header: rn.inherited.Clone(),
		Body: http.NoBody, Host: c.host, RemoteAddr: c.remoteAddr, RequestURI: c.path, TLS: c.tls,
	}
	if req.Header == nil {
		req.Header = http.Header{} // placeholders of headers read it
	}
	repl := caddy.NewReplacer()
	caddyhttp.PrepareRequest(req.WithContext(context.Background()), repl, &opWriter{header: http.Header{}}, rn.srv)
	return repl.ReplaceAll(h.Rate.Key, "")
}

// waitedOut is the result of an operation whose time ran out waiting
// for a turn downstream.
func (rn *runner) waitedOut(parent context.Context) result {
	if parent.Err() != nil {
		return rn.cutOff(parent)
	}
	return result{status: http.StatusGatewayTimeout, err: fmt.Sprintf(
		"operation timed out after %s waiting to be sent downstream (max_inflight, rate or pacing)", time.Duration(rn.h.OpTimeout))}
}

// adaptiveBackoff is the least wait before try attempt+1 of an adaptive
// operation answered 429, whatever the pause: an API that answers 429
// with Retry-After: 0 is not asked again at once.
func adaptiveBackoff(attempt int) time.Duration {
	return min(100*time.Millisecond<<min(max(attempt-1, 0), 10), maxPause)
}
