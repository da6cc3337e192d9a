package batch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// AsyncConfig enables asynchronous batches: a batch sent with
// "Prefer: respond-async" or "async": true is validated, stored and answered
// 202 at once with a job id; its progress and results are read, and the job
// canceled, at <batch path>/<id>. Jobs live in Caddy's storage, so every
// instance sharing it answers for every job.
type AsyncConfig struct {
	// How long a job and its results are kept after it was submitted; it
	// also bounds how long a job may run. Default: 24h.
	Retention caddy.Duration `json:"retention,omitempty"`

	// How many jobs run at once in this process. Jobs beyond that wait in
	// a queue. The pool is shared by all batch handlers of the process and
	// survives config reloads. Default: 4.
	Workers int `json:"workers,omitempty"`

	// How many jobs may wait for a worker in this process, at least 1; a
	// batch sent when as many wait is answered 503 with Retry-After, and
	// nothing of it is stored. Like workers, the limit is the process's:
	// the config loaded last sets it. A queued job holds in memory only
	// the headers its operations inherit; its operations wait in storage.
	// Default: 1000.
	MaxQueued int `json:"max_queued,omitempty"`

	// What identifies the owner of a job: a placeholder evaluated on the
	// submitting request and on every request for the job; only a request
	// that evaluates to the same value may read or cancel it. Only a hash
	// of it is stored. Idempotency keys belong to owners the same way.
	// Default: {http.request.header.Authorization}.
	Owner string `json:"owner,omitempty"`

	// The most operations one async job may hold. A job of more than the
	// handler's max_ops, or with a body over its max_body_size, is
	// streamed into storage as it is read, and its operations must stand
	// alone: no depends_on, references, rollbacks or all_or_nothing.
	// Default: 1000000.
	MaxOps int `json:"max_ops,omitempty"`

	// The largest async job body accepted, in bytes, streamed into
	// storage; larger is answered 413 and nothing of it is kept.
	// Default: 1 GiB.
	MaxBodySize int64 `json:"max_body_size,omitempty"`

	// How long the lease an instance holds on a job it runs lasts
	// unrenewed: how long after an instance dies another one takes its
	// jobs over. It is renewed every quarter of it. Default: 30s.
	Lease caddy.Duration `json:"lease,omitempty"`

	// The key, 32 bytes in hex or base64 (such as {env.BATCH_KEY}), with
	// which what a job's operations inherit from the request that
	// submitted it (Authorization, Cookie, ...) is stored encrypted
	// (AES-256-GCM), with its operations: any instance can then resume
	// the job. Without it, a job inheriting any header but a few that
	// never carry credentials (Accept, User-Agent, ...) keeps them in the
	// memory of the instance that took it, which alone can run it.
	CredentialsKey string `json:"credentials_key,omitempty"`

	// Keys that jobs may still be encrypted with, after credentials_key
	// has been changed: they decrypt, credentials_key encrypts.
	OldCredentialsKeys []string `json:"old_credentials_keys,omitempty"`

	// The header each operation of a job is sent with, valued
	// "<job id>.<op id>", so that the API can tell an operation sent again
	// after a crash from a new one; an operation's own header wins. "off"
	// sends none. Default: Idempotency-Key.
	OpIdempotencyHeader string `json:"op_idempotency_header,omitempty"`

	// Where to tell that a job has ended (or progressed).
	Webhook *Webhook `json:"webhook,omitempty"`
}

// Job states.
const (
	jobQueued    = "queued"
	jobRunning   = "running"
	jobCompleted = "completed"
	jobError     = "error"
	jobCanceled  = "canceled"
)

const (
	jobsPrefix = "batch/jobs"
	// resultsPerChunk results are stored together: a large job writes one
	// key per chunk, never one growing blob. Offsets map to chunks by
	// count; a chunk whose results exceed partSize is stored in parts
	// (results/NNNNNN, then NNNNNN.1, NNNNNN.2 …), so that neither a job
	// nor a reader of its results holds more than one part.
	resultsPerChunk = 100
	partSize        = 1 << 20

	// A queued job holds in memory only what its operations inherit:
	// its operations wait in storage.
	defaultMaxQueued = 1000

	defaultAsyncMaxOps  = 1_000_000
	defaultAsyncMaxBody = 1 << 30
	defaultLease        = 30 * time.Second
)

// progress is what a client sees of a job.
type progress struct {
	ID          string     `json:"id"`
	Status      string     `json:"status"`
	Total       int        `json:"total"`
	Completed   int        `json:"completed"`
	Succeeded   int        `json:"succeeded"`
	Failed      int        `json:"failed"`
	Skipped     int        `json:"skipped"`
	CreatedAt   time.Time  `json:"created_at"`
	StartedAt   *time.Time `json:"started_at,omitempty"`
	UpdatedAt   *time.Time `json:"updated_at,omitempty"`
	CompletedAt *time.Time `json:"completed_at,omitempty"`
	// Rate is how many operations a second the job completed over the
	// last minute; EstimatedCompletionAt when, at that rate, it ends.
	Rate                  float64    `json:"operations_per_second,omitempty"`
	EstimatedCompletionAt *time.Time `json:"estimated_completion_at,omitempty"`
	Error                 string     `json:"error,omitempty"`
}

// jobRecord is what storage holds of a job besides its results.
type jobRecord struct {
	progress
	Outcome string `json:"outcome,omitempty"` // the envelope status, once ended
	// Format is the wire format the job was submitted in, which its
	// results are served in; "" for native.
	Format    string    `json:"format,omitempty"`
	Owner     string    `json:"owner"` // hash of the owner's credentials
	ExpiresAt time.Time `json:"expires_at"`
	// Unstored counts the last results that storage did not take; the
	// first Completed-Unstored are stored. While the job runs, none are
	// unstored: the record is stored with each part of results, and
	// counts those stored so far, where a resumed job goes on.
	Unstored int `json:"unstored,omitempty"`
	// Stopped is the operation at which stop_on_error stopped the job.
	Stopped string `json:"stopped,omitempty"`
}

func (p *progress) final() bool {
	return p.Status == jobCompleted || p.Status == jobError || p.Status == jobCanceled
}

func jobKey(id string, parts ...string) string {
	return path.Join(append([]string{jobsPrefix, id}, parts...)...)
}

// partKey is where part of a chunk of results is stored; part 0 has the
// chunk's own key, as chunks had before they were split.
func partKey(id string, chunk, part int) string {
	k := fmt.Sprintf("%06d", chunk)
	if part > 0 {
		k += "." + strconv.Itoa(part)
	}
	return jobKey(id, "results", k)
}

// now is the clock; tests may move it.
var now = time.Now

// job is an async batch this process has queued or runs, or has run and
// not yet recorded as ended.
type job struct {
	h *Handler
	// endpoint is where the job was submitted: once it starts, it runs
	// through the handler serving there then, of a newer config if one
	// has been loaded since.
	endpoint string
	spec     *jobSpec
	// lease is this instance's hold on the job in storage, renewed until
	// the job ends or is handed over.
	lease *lease

	// event is what the webhook is to be told of the job's end.
	event *webhookEvent

	mu  sync.Mutex
	rn  *runner // nil once the job has ended: its batch and credentials go
	rec jobRecord
}

// snapshot returns the job's record as it is now.
func (j *job) snapshot() jobRecord {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.rec
}

// save stores the job's record.
func (j *job) save(ctx context.Context) error { return j.saveRecord(ctx, j.snapshot()) }

// saveRecord stores rec as the job's record.
func (j *job) saveRecord(ctx context.Context, rec jobRecord) error {
	buf, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return j.h.storage.Store(ctx, jobKey(rec.ID, "job"), buf)
}

// requestCancel stops the job at the next operation it would start.
func (j *job) requestCancel() {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.rn != nil {
		j.rn.canceled.Store(true)
	}
}

// resumable reports whether another instance can take the job over: what
// its operations inherit is stored, or nothing.
func (j *job) resumable() bool { return !j.spec.Local }

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

	deliveries  int  // webhook deliveries in flight
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

// evictExpired takes the jobs that expired while they waited out of the
// queue, to end them without running. p.mu is held.
func (p *jobPool) evictExpired() {
	t := now()
	kept := p.queue[:0]
	for _, j := range p.queue {
		if t.Before(j.rec.ExpiresAt) {
			kept = append(kept, j)
			continue
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.expire(j)
		}()
	}
	clear(p.queue[len(kept):])
	p.queue = kept
}

// sweepQueue ends the queued jobs that have expired.
func (p *jobPool) sweepQueue() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed {
		p.evictExpired()
	}
}

// endpoint is a handler serving async batches, and what it serves them
// with.
type endpoint struct {
	h    *Handler
	next caddyhttp.Handler
	srv  *caddyhttp.Server
}

// endpointKey names where r, a request for batches at batchPath, is
// served: server, host and path stay the same across config reloads.
func endpointKey(srv *caddyhttp.Server, r *http.Request, batchPath string) string {
	host, _, err := net.SplitHostPort(r.Host)
	if err != nil {
		host = r.Host
	}
	return srv.Name() + "\x00" + strings.ToLower(host) + "\x00" + batchPath
}

// serveAt records that ep serves at key, as of now.
func (p *jobPool) serveAt(key string, ep endpoint) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.endpoints == nil {
		p.endpoints = map[string]endpoint{}
	}
	p.endpoints[key] = ep
}

func (p *jobPool) endpointAt(key string) (endpoint, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ep, ok := p.endpoints[key]
	return ep, ok
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

// run runs one job to its end, or until it is handed over, and records
// it.
func (p *jobPool) run(j *job) {
	defer p.wg.Done()
	defer p.release()
	h, rn := j.h, j.rn
	if !now().Before(j.rec.ExpiresAt) {
		// Its id already answers 404: it must not run either.
		p.expire(j)
		return
	}
	if ep, ok := p.endpointAt(j.endpoint); ok && ep.h != rn.h {
		// Reloaded while the job waited: it runs through the new config
		// (its record stays where it was submitted).
		rn.h, rn.next, rn.srv = ep.h, ep.next, ep.srv
		rn.logs = rn.accessLoggers()
		rn.refs.reset(ep.h.MaxReferenceSize)
	}
	ctx, cancel := context.WithDeadline(p.ctx, j.rec.ExpiresAt)
	defer cancel()
	if j.lease != nil {
		// Another instance took the job over: this one stops at once.
		ctx = j.lease.watch(ctx)
	}
	started := now()
	rn.base = ctx
	if j.resumable() {
		rn.handover = &p.draining
	}
	if rn.b == nil { // until its operations are loaded
		rn.b = &batch{format: formatNamed(j.rec.Format), mode: j.spec.Mode, atomicity: j.spec.Atomicity}
	}
	if h.storage.Exists(ctx, jobKey(j.rec.ID, "cancel")) {
		rn.canceled.Store(true) // while it waited for an instance
	}
	// Storage writes outlive a shutdown's cancel: the record must say how
	// the job ended.
	store := context.WithoutCancel(ctx)

	j.mu.Lock()
	j.rec.Status, j.rec.UpdatedAt = jobRunning, &started
	if j.rec.StartedAt == nil {
		j.rec.StartedAt = &started
	}
	resumed := j.rec.Completed > 0
	j.mu.Unlock()
	if err := j.save(store); err != nil {
		h.logger.Error("storing async batch", zap.String("id", j.rec.ID), zap.Error(err))
	}
	h.metrics.jobs.WithLabelValues(jobRunning).Inc()
	h.logger.Info("async batch started", zap.String("id", j.rec.ID), zap.Int("operations", j.rec.Total),
		zap.Bool("resumed", resumed), zap.Int("from", j.rec.Completed))

	stopWatch := j.watchCancel(ctx, rn)
	sink := &storeSink{j: j, rn: rn, ctx: store, stop: ctx}
	err := sink.resume()
	if err == nil {
		err = j.runChunks(ctx, rn, sink)
	}
	sink.close(summary{})
	stopWatch()

	switch {
	case j.lease != nil && j.lease.lost():
		// Another instance runs it now, and records it: nothing more is
		// this one's to say.
		h.logger.Warn("async batch taken over by another instance", zap.String("id", j.rec.ID))
		p.forget(j)
		return
	case j.resumable() && p.draining.Load() && sink.err == nil && sink.stored < j.rec.Total &&
		!rn.canceled.Load() && (err == nil || ctx.Err() != nil):
		p.handOff(j, store)
		return
	}

	// A new variable: readers hold pointers to the last one.
	ended := now()
	j.mu.Lock()
	j.rec.UpdatedAt, j.rec.CompletedAt = &ended, &ended
	j.rec.Rate, j.rec.EstimatedCompletionAt = 0, nil
	j.rec.Unstored = j.rec.Completed - sink.stored
	switch {
	case err != nil:
		j.rec.Status, j.rec.Error = jobError, cut(err.Error(), maxEcho*4)
	case sink.err != nil:
		j.rec.Status, j.rec.Error = jobError, "storing results: "+sink.err.Error()
	case errors.Is(context.Cause(ctx), errInterrupted):
		j.rec.Status, j.rec.Error = jobError, "interrupted"
	case rn.canceled.Load():
		j.rec.Status = jobCanceled
	default:
		j.rec.Status = jobCompleted
	}
	sum := j.summary(rn)
	j.rec.Outcome = sum.status
	// Counted before any reader can see the job ended.
	h.metrics.jobs.WithLabelValues(j.rec.Status).Inc()
	rec := j.rec
	j.rn = nil
	j.mu.Unlock()
	rn.recordBatch(sum, ended.Sub(*rec.StartedAt))
	rn.logEnd(sum, ended.Sub(*rec.StartedAt))
	// Stored before the end is: an instance that finds the job ended finds
	// the event it owes too.
	if j.event = h.endEvent(rec); j.event != nil {
		if err := h.storeEvent(store, rec.ID, j.event); err != nil {
			h.logger.Error("storing the webhook event of an async batch", zap.String("id", rec.ID), zap.Error(err))
		}
	}
	if err := j.save(store); err != nil {
		h.logger.Error("storing the end of an async batch; retrying", zap.String("id", rec.ID), zap.Error(err))
		p.wg.Add(1)
		go p.saveLater(j)
	} else {
		p.ended(j)
	}
	h.logger.Info("async batch ended", zap.String("id", rec.ID), zap.String("status", rec.Status),
		zap.String("outcome", rec.Outcome), zap.String("error", rec.Error))
}

// runChunks runs the job's operations chunk by chunk, from the first
// without a stored result, until all have run or the job is handed over.
func (j *job) runChunks(ctx context.Context, rn *runner, sink *storeSink) error {
	spec := j.spec
	done := sink.stored
	for c := chunkOf(spec.Starts, done); c < len(spec.Starts); c++ {
		first := spec.Starts[c]
		b, err := j.h.loadChunk(ctx, spec, j.rec.ID, j.rec.Format, c, first)
		if err != nil {
			return err
		}
		rn.load(b)
		from := max(done-first, 0)
		if from > 0 {
			if err := j.h.loadEarlier(ctx, j.rec, rn, first, from); err != nil {
				return err
			}
		}
		if j.rec.Stopped != "" && rn.stoppedBy == "" {
			rn.stoppedBy = j.rec.Stopped
			for i, op := range b.ops[:from] {
				if op.id == j.rec.Stopped {
					rn.stoppedAt = i
				}
			}
		}
		rn.runFrom(sink, from)
		if rn.out.hold && rn.handedOver() {
			// Held results may still change: where the job resumes, these
			// operations run again, and nothing of them is stored here.
			return nil
		}
		rn.out.flush()
		rn.recordOps(from)
		if sink.halted || sink.err != nil || rn.out.next < len(b.ops) {
			return nil // handed over, or cut off: what has run is stored
		}
	}
	return nil
}

// chunkOf returns the chunk that holds operation i.
func chunkOf(starts []int, i int) int {
	c, _ := slices.BinarySearch(starts, i+1)
	return max(c-1, 0)
}

// summary is what the job's operations came to, counted as stored.
func (j *job) summary(rn *runner) summary {
	r := &j.rec
	s := summary{total: r.Total, succeeded: r.Succeeded, failed: r.Failed, skipped: r.Skipped}
	switch {
	case rn.rollbackFailed.Load():
		s.status = statusRollbackFailed
	case rn.stoppedBy != "" && rn.b.atomicity == atomicAllOrNothing:
		s.status = statusRolledBack
	case rn.stoppedBy != "":
		s.status = statusAborted
	case r.Completed == r.Succeeded && r.Completed == r.Total:
		s.status = statusCompleted
	default:
		s.status = statusCompletedWithErrors
	}
	return s
}

// handOff leaves a job that has not ended to the instance that resumes it:
// its record says how far it is, and its lease is released at once.
func (p *jobPool) handOff(j *job, ctx context.Context) {
	t := now()
	j.mu.Lock()
	j.rec.Status, j.rec.UpdatedAt = jobQueued, &t
	j.rec.Rate, j.rec.EstimatedCompletionAt = 0, nil
	j.mu.Unlock()
	if err := j.save(ctx); err != nil {
		// The lease then expires, and the job resumes from the last part
		// of results the record counts.
		j.h.logger.Error("storing an async batch handed over", zap.String("id", j.rec.ID), zap.Error(err))
	}
	if j.lease != nil {
		j.lease.release(ctx)
	}
	p.forget(j)
	j.h.logger.Info("async batch handed over", zap.String("id", j.rec.ID), zap.Int("completed", j.rec.Completed))
}

// ended drops a job whose end is stored, once the webhook has been told.
func (p *jobPool) ended(j *job) {
	p.forget(j)
	if j.event != nil {
		j.h.sendEnd(p, j.rec.ID, j.lease, j.event)
		return
	}
	if j.lease != nil {
		j.lease.release(context.Background())
	}
	j.h.deactivate(j.rec.ID)
}

// expire ends a job that expired before it started: it does not run, and
// what storage holds of it goes.
func (p *jobPool) expire(j *job) {
	h := j.h
	t := now()
	j.mu.Lock()
	j.rec.Status, j.rec.Error, j.rec.UpdatedAt, j.rec.CompletedAt = jobError, "expired before it started", &t, &t
	rec := j.rec
	j.rn = nil
	j.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	p.ended(j)
	if err := deleteTree(ctx, h.storage, jobKey(rec.ID)); err != nil {
		h.logger.Warn("deleting expired batch job", zap.String("id", rec.ID), zap.Error(err))
	}
	h.metrics.jobs.WithLabelValues(jobError).Inc()
	h.logger.Warn("async batch expired before it started", zap.String("id", rec.ID))
	if ev := h.endEvent(rec); ev != nil {
		h.sendEnd(p, rec.ID, nil, ev) // at most once: nothing of the job is kept
	}
}

// saveLater stores the record of an ended job that storage refused, with
// backoff, until it is stored, the job expires or the pool ends; the job
// stays in memory till then.
func (p *jobPool) saveLater(j *job) {
	defer p.wg.Done()
	wait := storeRetry
	for {
		left := j.rec.ExpiresAt.Sub(now())
		if left <= 0 {
			j.h.logger.Error("async batch expired before its end could be stored", zap.String("id", j.rec.ID))
			p.ended(j)
			return
		}
		last := !sleepCtx(p.ctx, min(wait, left))
		ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
		err := j.save(ctx)
		cancel()
		if err == nil {
			j.h.logger.Info("stored the end of an async batch", zap.String("id", j.rec.ID))
			p.ended(j)
			return
		}
		if last {
			// Its lease then expires, and the instance that takes it over
			// finds it where its last stored record says.
			j.h.logger.Error("storing the end of an async batch: giving up at shutdown", zap.String("id", j.rec.ID), zap.Error(err))
			p.forget(j)
			return
		}
		wait = min(2*wait, time.Minute)
	}
}

// watchCancel polls storage for a cancel request made through another
// instance, until the returned func is called.
func (j *job) watchCancel(ctx context.Context, rn *runner) (stop func()) {
	ctx, stop = context.WithCancel(ctx)
	go func() {
		tick := time.NewTicker(cancelPoll)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				if j.h.storage.Exists(ctx, jobKey(j.rec.ID, "cancel")) {
					rn.canceled.Store(true)
					return
				}
			}
		}
	}()
	return stop
}

// cancelPoll is how often a running job looks for a cancel request.
var cancelPoll = time.Second

// errBadRecord marks a stored record (a job's, an idempotent answer's)
// that cannot be read: it is replaced or swept, never trusted.
var errBadRecord = errors.New("unreadable record")

// sweepJobs deletes expired jobs until ctx ends.
func (h *Handler) sweepJobs(ctx context.Context) {
	every := min(max(time.Duration(h.Async.Retention)/4, time.Second), time.Hour)
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		h.deleteExpired(ctx)
		h.pool.sweepQueue()
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// jobIDs lists the job ids under prefix; none, logged, if storage fails.
func (h *Handler) jobIDs(ctx context.Context, prefix string) []string {
	keys, err := h.storage.List(ctx, prefix, false)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			h.logger.Warn("listing async batches", zap.String("prefix", prefix), zap.Error(err))
		}
		return nil
	}
	for i, k := range keys {
		keys[i] = path.Base(k)
	}
	return keys
}

func (h *Handler) deleteExpired(ctx context.Context) {
	for _, id := range h.jobIDs(ctx, jobsPrefix) {
		rec, err := h.loadJob(ctx, id)
		switch {
		case err == nil:
			if !now().After(rec.ExpiresAt) {
				continue
			}
		case errors.Is(err, fs.ErrNotExist) || errors.Is(err, errBadRecord):
			// No record says when it expires, but no job lives longer
			// than retention: keys older than that belong to none.
			if !h.idleFor(ctx, jobKey(id), time.Duration(h.Async.Retention)) {
				continue
			}
		default:
			continue // storage trouble: next time
		}
		if err := deleteTree(ctx, h.storage, jobKey(id)); err != nil {
			h.logger.Warn("deleting expired batch job", zap.String("id", id), zap.Error(err))
		}
	}
}

// idleFor reports whether nothing under prefix has been written for d.
func (h *Handler) idleFor(ctx context.Context, prefix string, d time.Duration) bool {
	keys, err := h.storage.List(ctx, prefix, true)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false
	}
	since := now().Add(-d)
	for _, k := range append(keys, prefix) {
		info, err := h.storage.Stat(ctx, k)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			// Gone meanwhile, or a prefix that is no key of its own.
		case err != nil || info.Modified.After(since):
			return false
		}
	}
	return true
}

// deleteTree deletes prefix and every key under it, key by key, as storage
// modules other than the file system need.
func deleteTree(ctx context.Context, s certmagic.Storage, prefix string) error {
	keys, err := s.List(ctx, prefix, true)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	for i := len(keys) - 1; i >= 0; i-- {
		if err := s.Delete(ctx, keys[i]); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	if err := s.Delete(ctx, prefix); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
