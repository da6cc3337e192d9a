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

// jobPool runs the async jobs of the process, at most limit at once, with
// at most maxQueued waiting. It is kept in a UsagePool, so that config
// reloads neither drop nor duplicate jobs; it ends when the last config
// using it is unloaded.
type jobPool struct {
	// ctx ends the jobs; hooks ends webhook deliveries, a grace later.
	ctx       context.Context
	cancel    context.CancelCauseFunc
	hooks     context.Context
	stopHooks context.CancelFunc

	mu        sync.Mutex
	cond      *sync.Cond
	limit     int
	maxQueued int
	running   int
	reserved  int // queue places held by jobs whose record is being stored
	queue     []*job
	// jobs holds the queued and running jobs by id, and the ended ones
	// whose record storage has not taken yet: this instance answers for
	// them, not storage's stale record.
	jobs   map[string]*job
	closed bool
	wg     sync.WaitGroup // running jobs and the retries of their records

	// endpoints are where handlers have served async batches, by
	// server, host and batch path: what a job submitted there runs
	// through once it starts.
	endpoints map[string]endpoint

	deliveries int // webhook deliveries in flight
	// sending holds the jobs whose end event this process is delivering:
	// ended and forgotten, they are not orphans to take over.
	sending     map[string]bool
	hooksClosed bool // no more deliveries start
	hookWG      sync.WaitGroup

	// instance names this process in the leases it holds.
	instance string
	// leases ends the renewal of every lease, once the jobs are done.
	leases     context.Context
	stopLeases context.CancelFunc
	// draining is set at shutdown: jobs that another instance can resume
	// start no more operations, and are handed over once those in flight
	// have finished.
	draining atomic.Bool
	grace    time.Duration // how long those in flight may take
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
	p := &jobPool{ctx: ctx, cancel: cancel, hooks: hooks, stopHooks: stopHooks,
		leases: leases, stopLeases: stopLeases, instance: newBatchID(), grace: jobsGrace,
		limit: 1, maxQueued: 1, jobs: map[string]*job{}}
	p.cond = sync.NewCond(&p.mu)
	go p.loop()
	return p
}

// setLimits sets how many jobs run at once and how many may wait.
func (p *jobPool) setLimits(workers, queued int) {
	p.mu.Lock()
	p.limit, p.maxQueued = workers, queued
	p.mu.Unlock()
	p.cond.Broadcast()
}

// setGrace sets how long a shutdown lets operations in flight finish.
func (p *jobPool) setGrace(d time.Duration) {
	p.mu.Lock()
	p.grace = d
	p.mu.Unlock()
}

// hasRoom reports whether a job taken over would start at once: jobs
// that would wait stay in storage for an instance with a worker free.
func (p *jobPool) hasRoom() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.closed && p.running+len(p.queue)+p.reserved < p.limit
}

// adopt queues a job taken over from another instance.
func (p *jobPool) adopt(j *job) bool {
	p.mu.Lock()
	if p.closed || p.jobs[j.rec.ID] != nil {
		p.mu.Unlock()
		return false
	}
	p.queue = append(p.queue, j)
	p.jobs[j.rec.ID] = j
	p.mu.Unlock()
	p.cond.Signal()
	return true
}

// reserve holds a place in the queue for a job while its record is
// stored, so that a refused job stores nothing.
func (p *jobPool) reserve() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return errPoolClosed
	}
	if len(p.queue)+p.reserved >= p.maxQueued {
		p.evictExpired()
	}
	if len(p.queue)+p.reserved >= p.maxQueued {
		return errQueueFull
	}
	p.reserved++
	return nil
}

// hasQueueRoom reports whether a job would find a place in the queue now.
func (p *jobPool) hasQueueRoom() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.closed && len(p.queue)+p.reserved < p.maxQueued
}

func (p *jobPool) unreserve() {
	p.mu.Lock()
	p.reserved--
	p.mu.Unlock()
}

// submit queues a job whose place was reserved; when it cannot, the
// place stays reserved for the caller to give back.
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
	p.cond.Signal()
	return nil
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

func (p *jobPool) loop() {
	for {
		p.mu.Lock()
		for !p.closed && (len(p.queue) == 0 || p.running >= p.limit) {
			p.cond.Wait()
		}
		if p.closed {
			p.mu.Unlock()
			return
		}
		j := p.queue[0]
		p.queue[0] = nil
		p.queue = p.queue[1:]
		p.running++
		p.wg.Add(1)
		p.mu.Unlock()
		go p.run(j)
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

// release frees the worker slot of a job that has ended.
func (p *jobPool) release() {
	p.mu.Lock()
	p.running--
	p.mu.Unlock()
	p.cond.Signal()
}

// Destruct hands over the jobs another instance can resume: those queued
// at once, those running once the operations they have in flight finish,
// within the grace period; operations still in flight then are cut off,
// and run again where the job resumes. Jobs whose credentials live only in
// this process run on during the grace, then end interrupted. Webhook
// deliveries get a grace after the jobs have ended, then are canceled.
func (p *jobPool) Destruct() error {
	p.mu.Lock()
	p.closed = true
	queued := p.queue
	p.queue = nil
	p.running += len(queued)
	p.wg.Add(len(queued))
	grace := p.grace
	p.mu.Unlock()
	p.cond.Broadcast()
	p.draining.Store(true)
	var local []*job
	for _, j := range queued {
		if !j.resumable() {
			local = append(local, j)
			continue
		}
		go func() {
			defer p.wg.Done()
			defer p.release()
			p.handOff(j, context.Background())
		}()
	}
	waitFor(&p.wg, grace)
	p.cancel(errInterrupted)
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
	p.mu.Unlock()
	p.hookWG.Done()
}
