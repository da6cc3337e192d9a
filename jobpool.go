package batch

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// jobPool runs the async jobs of the process, at most limit at once. The
// jobs waiting for a worker wait in the cluster's queue in storage, where
// any instance with a worker free takes them (queue.go), or, those that
// only this process can run, in its memory; at most maxQueued that this
// process took wait at once. It is kept in a UsagePool, so that config
// reloads neither drop nor duplicate jobs; it ends when the last config
// using it is unloaded.
type jobPool struct {
	// ctx ends the jobs; hooks ends webhook deliveries, a grace later.
	ctx       context.Context
	cancel    context.CancelCauseFunc
	hooks     context.Context
	stopHooks context.CancelFunc

	mu        sync.Mutex
	limit     int
	maxQueued int
	running   int
	reserved  int // queue places held by jobs whose record is being stored
	// queue holds the jobs waiting that only this process can run.
	queue []*job
	// queued holds the jobs this process put in the cluster's queue that
	// it has not seen taken yet: they count against maxQueued.
	queued map[string]queuedHere
	// jobs holds the running jobs and those of queue by id, and the
	// ended ones whose record storage has not taken yet: this instance
	// answers for them, not storage's stale record.
	jobs   map[string]*job
	closed bool
	wg     sync.WaitGroup // running jobs and the retries of their records
	// turn is the owner (ownerToken) whose job this process started
	// last: the next look serves the owners after it first.
	turn string
	// wakers are the looks of the handlers using the pool, woken when a
	// worker frees or a job is queued.
	wakers map[*asyncJobs]chan struct{}

	// endpoints are where handlers have served async batches, by
	// server, host and batch path: what a job submitted there runs
	// through once it starts. endpointsGen counts their changes.
	endpoints    map[string]endpoint
	endpointsGen int

	deliveries int // webhook deliveries in flight
	// owed holds the ended jobs this process put back in the cluster's
	// queue, their event owed, because no delivery could start: looks
	// pass over them until one can.
	owed map[string]bool
	// sending holds the jobs whose end event this process is delivering:
	// ended and forgotten, they are not orphans to take over.
	sending     map[string]bool
	hooksClosed bool // no more deliveries start
	hookWG      sync.WaitGroup

	// leases ends the renewal of every heartbeat, once the jobs are done.
	leases     context.Context
	stopLeases context.CancelFunc
	// draining is set at shutdown: jobs that another instance can resume
	// start no more operations, and are handed over once those in flight
	// have finished.
	draining atomic.Bool
	grace    time.Duration // how long those in flight may take

	// looks and renewals count the looks for work and the renewals of a
	// heartbeat that this process made, for tests.
	looks, renewals atomic.Int64
}

// queuedHere is a job this process put in the cluster's queue: the
// storage it waits in, and when it was put there.
type queuedHere struct {
	s  *store
	at time.Time
}

var pools = caddy.NewUsagePool()

const poolKey = "batch.async"

var (
	errQueueFull  = errors.New("too many async batches are queued; try again later")
	errPoolClosed = errors.New("async batches are shutting down; try again later")
)

// queueRetryAfter is the Retry-After, in seconds, of a job refused because
// the queue is full: a guess, as how long queued jobs take is unknown.
const queueRetryAfter = 10

// Tuning, variables so that tests may shorten them.
var (
	// storeRetry is the first wait before results or a record storage
	// refused are stored again; each retry doubles it, up to a minute.
	storeRetry = time.Second
	// jobsGrace is how long Destruct waits for interrupted jobs to record
	// their end; webhookGrace how long it then lets deliveries go on.
	jobsGrace    = 10 * time.Second
	webhookGrace = 5 * time.Second
	// maxDeliveries bounds webhook deliveries in flight in the process:
	// each holds a goroutine and its event while a slow or failing
	// receiver retries; beyond it, events are dropped.
	maxDeliveries = 1000
)

const (
	storeAttempts = 3           // tries of one part of results
	storeTimeout  = time.Minute // of one retried write of a record
)

func newJobPool() *jobPool {
	ctx, cancel := context.WithCancelCause(context.Background())
	hooks, stopHooks := context.WithCancel(context.Background())
	leases, stopLeases := context.WithCancel(context.Background())
	return &jobPool{ctx: ctx, cancel: cancel, hooks: hooks, stopHooks: stopHooks,
		leases: leases, stopLeases: stopLeases, grace: jobsGrace,
		limit: 1, maxQueued: 1, jobs: map[string]*job{}, queued: map[string]queuedHere{}, wakers: map[*asyncJobs]chan struct{}{}}
}

// setLimits sets how many jobs run at once and how many may wait.
func (p *jobPool) setLimits(workers, queued int) {
	p.mu.Lock()
	p.limit, p.maxQueued = workers, queued
	p.mu.Unlock()
	p.kick()
}

// setGrace sets how long a shutdown lets operations in flight finish.
func (p *jobPool) setGrace(d time.Duration) {
	p.mu.Lock()
	p.grace = d
	p.mu.Unlock()
}

// hasRoom reports whether a worker is free.
func (p *jobPool) hasRoom() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.closed && p.running < p.limit
}

// takeWorker takes a free worker for a job about to start; false if none
// is free. The job then runs with startRun, or the worker is given back
// with freeWorker.
func (p *jobPool) takeWorker() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.running >= p.limit {
		return false
	}
	p.running++
	p.wg.Add(1)
	return true
}

// freeWorker gives back a worker that started nothing.
func (p *jobPool) freeWorker() {
	p.mu.Lock()
	p.running--
	p.mu.Unlock()
	p.wg.Done()
}

// startRun runs j on the worker taken for it.
func (p *jobPool) startRun(j *job) {
	p.mu.Lock()
	p.jobs[j.rec.ID] = j
	p.mu.Unlock()
	go p.run(j)
}

// runNow runs j at once, outside the limit: a canceled job only skips.
func (p *jobPool) runNow(j *job) {
	p.mu.Lock()
	p.running++
	p.wg.Add(1)
	p.jobs[j.rec.ID] = j
	p.mu.Unlock()
	go p.run(j)
}

// reserve holds a place in the queue for a job while its record is
// stored, so that a refused job stores nothing.
func (p *jobPool) reserve() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return errPoolClosed
	}
	if p.waitingLocked() >= p.maxQueued {
		p.evictExpired()
	}
	if p.waitingLocked() >= p.maxQueued {
		return errQueueFull
	}
	p.reserved++
	return nil
}

// waitingLocked counts the jobs this process took that wait. p.mu is held.
func (p *jobPool) waitingLocked() int { return len(p.queue) + len(p.queued) + p.reserved }

// hasQueueRoom reports whether a job would find a place in the queue now.
func (p *jobPool) hasQueueRoom() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.closed && p.waitingLocked() < p.maxQueued
}

func (p *jobPool) unreserve() {
	p.mu.Lock()
	p.reserved--
	p.mu.Unlock()
}

// submit queues in memory a job whose place was reserved, one that only
// this process can run; when it cannot, the place stays reserved for the
// caller to give back.
func (p *jobPool) submit(j *job) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return errPoolClosed
	}
	p.reserved--
	p.queue = append(p.queue, j)
	p.jobs[j.rec.ID] = j
	p.mu.Unlock()
	p.kick()
	return nil
}

// submitted counts a job this process put in the cluster's queue, whose
// place was reserved, until it is seen taken.
func (p *jobPool) submitted(id string, s *store, at time.Time) {
	p.mu.Lock()
	p.reserved--
	p.queued[id] = queuedHere{s, at}
	p.mu.Unlock()
	p.kick()
}

// seen drops from the count the jobs put in the cluster's queue in s that
// are no longer in it: present holds the ids it listed, from a List that
// started at listed.
func (p *jobPool) seen(s *store, present map[string]bool, listed time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for id, q := range p.queued {
		if q.s == s && q.at.Before(listed) && !present[id] {
			delete(p.queued, id)
		}
	}
}

// isQueuedHere reports whether this process put job id in the cluster's
// queue and has not seen it taken.
func (p *jobPool) isQueuedHere(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.queued[id]
	return ok
}

// taken drops a job from the count: this process took it out of the
// cluster's queue.
func (p *jobPool) taken(id string) {
	p.mu.Lock()
	delete(p.queued, id)
	p.mu.Unlock()
}

// queuesIn reports whether jobs this process put in the cluster's queue
// in s may still wait there.
func (p *jobPool) queuesIn(s *store) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, q := range p.queued {
		if q.s == s {
			return true
		}
	}
	return false
}

// waiting returns the jobs waiting in this process's memory, to join the
// round of a look.
func (p *jobPool) waiting() []queued {
	p.mu.Lock()
	defer p.mu.Unlock()
	w := make([]queued, 0, len(p.queue))
	for _, j := range p.queue {
		w = append(w, queued{owner: ownerToken(j.rec.Owner), created: j.rec.CreatedAt, expires: j.rec.windowEnd(), id: j.rec.ID, job: j})
	}
	return w
}

// takeWaiting takes j, which waits in memory, out of the queue to run on
// the worker taken for it; false if it no longer waits there.
func (p *jobPool) takeWaiting(j *job) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if i := slices.Index(p.queue, j); i >= 0 {
		p.queue = slices.Delete(p.queue, i, i+1)
		return true
	}
	return false
}

// served makes owner the one served last.
func (p *jobPool) served(owner string) {
	p.mu.Lock()
	p.turn = owner
	p.mu.Unlock()
}

func (p *jobPool) lastServed() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.turn
}

// wake registers a's look, to be woken when a worker frees or a job is
// queued, until sleep.
func (p *jobPool) wake(a *asyncJobs, ch chan struct{}) {
	p.mu.Lock()
	p.wakers[a] = ch
	p.mu.Unlock()
}

func (p *jobPool) sleep(a *asyncJobs) {
	p.mu.Lock()
	delete(p.wakers, a)
	p.mu.Unlock()
}

// kick wakes the looks.
func (p *jobPool) kick() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, ch := range p.wakers {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// evictExpired takes the jobs whose window passed while they waited out
// of the queue: they run at once, outside the limit, one after another
// (each writes its results), sending nothing, and end expired. p.mu is
// held.
func (p *jobPool) evictExpired() {
	t := now()
	kept := p.queue[:0]
	var expired []*job
	for _, j := range p.queue {
		if t.Before(j.rec.windowEnd()) {
			kept = append(kept, j)
			continue
		}
		expired = append(expired, j)
	}
	if len(expired) > 0 {
		p.running += len(expired)
		p.wg.Add(len(expired))
		go func() {
			for _, j := range expired {
				p.run(j)
			}
		}()
	}
	clear(p.queue[len(kept):])
	p.queue = kept
}

// sweepQueue ends the queued jobs whose window has passed.
func (p *jobPool) sweepQueue() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed {
		p.evictExpired()
	}
}

// holds reports whether this process queues, runs or holds job id, or
// delivers its end event.
func (p *jobPool) holds(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.jobs[id] != nil || p.sending[id]
}

// lookup returns the job if this process queues, runs or holds it.
func (p *jobPool) lookup(id string) *job {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.jobs[id]
}

// forget drops an ended job whose record is stored (or given up on).
func (p *jobPool) forget(j *job) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.jobs[j.rec.ID] == j {
		delete(p.jobs, j.rec.ID)
	}
}

// dequeue takes a job that has not started out of the queue.
func (p *jobPool) dequeue(j *job) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, q := range p.queue {
		if q == j {
			p.queue = slices.Delete(p.queue, i, i+1)
			p.running++ // it runs now, outside the limit: it only skips
			p.wg.Add(1)
			return true
		}
	}
	return false
}

// release frees the worker of a job that has ended.
func (p *jobPool) release() {
	p.mu.Lock()
	p.running--
	p.mu.Unlock()
	p.kick()
}

// Destruct hands over the jobs another instance can resume: those running
// go back to the cluster's queue once the operations they have in flight
// finish, within the grace period; operations still in flight then are
// cut off, and run again where the job resumes. (Those waiting are in the
// cluster's queue already.) Jobs whose credentials live only in this
// process run on during the grace, then end interrupted, and those of them
// that wait end so at once. Webhook deliveries get a grace after the jobs
// have ended, then are canceled.
func (p *jobPool) Destruct() error {
	p.mu.Lock()
	p.closed = true
	local := p.queue
	p.queue = nil
	grace := p.grace
	p.mu.Unlock()
	p.draining.Store(true)
	waitFor(&p.wg, grace) // for the jobs running: those waiting would not end
	p.cancel(errInterrupted)
	p.mu.Lock()
	p.running += len(local)
	p.wg.Add(len(local))
	p.mu.Unlock()
	for _, j := range local {
		go p.run(j) // with the pool canceled, every operation is cut off at once
	}
	waitFor(&p.wg, jobsGrace)
	p.stopLeases()

	p.mu.Lock()
	p.hooksClosed = true
	p.mu.Unlock()
	if !waitFor(&p.hookWG, webhookGrace) {
		p.stopHooks()
		waitFor(&p.hookWG, webhookGrace)
	}
	p.stopHooks()
	return nil
}

// waitFor waits at most d for wg; it reports whether wg is done.
func waitFor(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// sleepCtx waits d; false if ctx ended first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// startDelivery counts a delivery in, of the end event of job id if not
// ""; it returns why not when it may not start.
func (p *jobPool) startDelivery(id string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.hooksClosed:
		return "shutting down"
	case p.deliveries >= maxDeliveries:
		return "too many deliveries in flight"
	}
	p.deliveries++
	p.hookWG.Add(1)
	if id != "" {
		if p.sending == nil {
			p.sending = map[string]bool{}
		}
		p.sending[id] = true
	}
	return ""
}

func (p *jobPool) deliveryDone(id string) {
	p.mu.Lock()
	p.deliveries--
	delete(p.sending, id)
	p.owed = nil
	p.mu.Unlock()
	p.hookWG.Done()
}

// undelivered notes that ended job id waits in the cluster's queue with
// its event owed, as no delivery could start.
func (p *jobPool) undelivered(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.owed == nil {
		p.owed = map[string]bool{}
	}
	if len(p.owed) < maxDeliveries {
		p.owed[id] = true
	}
}

// owesUndelivered reports whether ended job id waits for a delivery to
// start.
func (p *jobPool) owesUndelivered(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.owed[id]
}
