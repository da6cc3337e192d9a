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
	// the config loaded last sets it. Default: as many as fit in 256 MiB,
	// at least 1, a queued job holding its body and the batch parsed from
	// it, up to 2 × max_body_size + 512 bytes × max_ops (12 jobs with the
	// default limits).
	MaxQueued int `json:"max_queued,omitempty"`

	// What identifies the owner of a job: a placeholder evaluated on the
	// submitting request and on every request for the job; only a request
	// that evaluates to the same value may read or cancel it. Only a hash
	// of it is stored. Idempotency keys belong to owners the same way.
	// Default: {http.request.header.Authorization}.
	Owner string `json:"owner,omitempty"`

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

	// queueBudget is what the queued jobs may hold by default.
	queueBudget = 256 << 20
)

// queuedCost bounds what a queued job holds: its body and the batch parsed
// from it, measured at twice the body and ~340 bytes per operation.
func queuedCost(maxBody int64, maxOps int) int64 { return 2*maxBody + 512*int64(maxOps) }

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
	UpdatedAt   *time.Time `json:"updated_at,omitempty"`
	CompletedAt *time.Time `json:"completed_at,omitempty"`
	Error       string     `json:"error,omitempty"`
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
	// first Completed-Unstored are stored.
	Unstored int `json:"unstored,omitempty"`
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
func (j *job) save(ctx context.Context) error {
	rec := j.snapshot()
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
	p := &jobPool{ctx: ctx, cancel: cancel, hooks: hooks, stopHooks: stopHooks,
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

// submit queues a job whose place was reserved.
func (p *jobPool) submit(j *job) error {
	p.mu.Lock()
	p.reserved--
	if p.closed {
		p.mu.Unlock()
		return errPoolClosed
	}
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

// Destruct interrupts the jobs that run and ends those that wait: their
// submitters' credentials live only in this process. Webhook deliveries
// get a grace after the jobs have ended, then are canceled.
func (p *jobPool) Destruct() error {
	p.mu.Lock()
	p.closed = true
	queued := p.queue
	p.queue = nil
	p.running += len(queued)
	p.wg.Add(len(queued))
	p.mu.Unlock()
	p.cond.Broadcast()
	p.cancel(errInterrupted)
	for _, j := range queued {
		go p.run(j) // with the pool canceled, every operation is cut off at once
	}
	waitFor(&p.wg, jobsGrace)

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

// run runs one job to its end and records it.
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
	started := now()
	rn.ctx = context.WithValue(ctx, batchCtxKey, rn.b)
	rn.results = make([]result, len(rn.b.ops))
	// Storage writes outlive a shutdown's cancel: the record must say how
	// the job ended.
	store := context.WithoutCancel(ctx)

	j.mu.Lock()
	j.rec.Status, j.rec.UpdatedAt = jobRunning, &started
	j.mu.Unlock()
	if err := j.save(store); err != nil {
		h.logger.Error("storing async batch", zap.String("id", j.rec.ID), zap.Error(err))
	}
	h.metrics.jobs.WithLabelValues(jobRunning).Inc()
	h.logger.Info("async batch started", zap.String("id", j.rec.ID), zap.Int("operations", len(rn.b.ops)))

	stopWatch := j.watchCancel(ctx, rn)
	sink := &storeSink{j: j, rn: rn, ctx: store, stop: ctx}
	sum := rn.execute(sink)
	stopWatch()

	// A new variable: readers hold pointers to the last one.
	ended := now()
	j.mu.Lock()
	j.rec.Outcome, j.rec.UpdatedAt, j.rec.CompletedAt = sum.status, &ended, &ended
	j.rec.Unstored = j.rec.Completed - sink.stored
	switch {
	case sink.err != nil:
		j.rec.Status, j.rec.Error = jobError, "storing results: "+sink.err.Error()
	case errors.Is(context.Cause(ctx), errInterrupted):
		j.rec.Status, j.rec.Error = jobError, "interrupted"
	case rn.canceled.Load():
		j.rec.Status = jobCanceled
	default:
		j.rec.Status = jobCompleted
	}
	// Counted before any reader can see the job ended.
	h.metrics.jobs.WithLabelValues(j.rec.Status).Inc()
	rec := j.rec
	j.rn = nil
	j.mu.Unlock()
	if err := j.save(store); err != nil {
		h.logger.Error("storing the end of an async batch; retrying", zap.String("id", rec.ID), zap.Error(err))
		p.wg.Add(1)
		go p.saveLater(j)
	} else {
		p.forget(j)
	}
	h.logger.Info("async batch ended", zap.String("id", rec.ID), zap.String("status", rec.Status),
		zap.String("outcome", rec.Outcome), zap.String("error", rec.Error))
	h.notify(p, rec.Status, rec.progress)
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
	p.forget(j)
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	if err := deleteTree(ctx, h.storage, jobKey(rec.ID)); err != nil {
		h.logger.Warn("deleting expired batch job", zap.String("id", rec.ID), zap.Error(err))
	}
	h.metrics.jobs.WithLabelValues(jobError).Inc()
	h.logger.Warn("async batch expired before it started", zap.String("id", rec.ID))
	h.notify(p, jobError, rec.progress)
}

// saveLater stores the record of an ended job that storage refused, with
// backoff, until it is stored, the job expires or the pool ends; the job
// stays in memory till then.
func (p *jobPool) saveLater(j *job) {
	defer p.wg.Done()
	defer p.forget(j)
	wait := storeRetry
	for {
		left := j.rec.ExpiresAt.Sub(now())
		if left <= 0 {
			j.h.logger.Error("async batch expired before its end could be stored", zap.String("id", j.rec.ID))
			return
		}
		last := !sleepCtx(p.ctx, min(wait, left))
		ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
		err := j.save(ctx)
		cancel()
		if err == nil {
			j.h.logger.Info("stored the end of an async batch", zap.String("id", j.rec.ID))
			return
		}
		if last {
			j.h.logger.Error("storing the end of an async batch: giving up at shutdown", zap.String("id", j.rec.ID), zap.Error(err))
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

// storeSink writes a job's results to storage in parts, and its progress
// after each. Once storage refuses a part, it stores nothing more, and the
// job skips the operations it has not started: their results could not be
// recorded.
type storeSink struct {
	j    *job
	rn   *runner
	ctx  context.Context // of writes: outlives the job's end
	stop context.Context // the job's: ends retries
	buf  []byte

	inBuf  int // results in buf
	n      int // results of the chunk so far, in its stored parts and buf
	chunk  int
	part   int // of the chunk, the next to store
	stored int // results in storage
	err    error
	enc    []byte // the result being put

	lastProgress time.Time
}

func (s *storeSink) put(_ int, op *operation, res *result) {
	s.enc = appendResult(s.enc[:0], -1, op, res, s.rn.b.lean)
	enc := s.enc
	s.j.mu.Lock()
	s.j.rec.Completed++
	switch outcomeOf(res) {
	case outcomeSucceeded:
		s.j.rec.Succeeded++
	case outcomeSkipped:
		s.j.rec.Skipped++
	default:
		s.j.rec.Failed++
	}
	s.j.mu.Unlock()
	if s.err != nil {
		return
	}
	if s.inBuf > 0 && len(s.buf)+1+len(enc) > partSize {
		if s.flush(false); s.err != nil {
			return
		}
	}
	if s.inBuf > 0 {
		s.buf = append(s.buf, ',')
	}
	s.buf = append(s.buf, enc...)
	s.inBuf++
	s.n++
	if s.n == resultsPerChunk {
		s.flush(true)
	} else if len(s.buf) >= partSize {
		s.flush(false)
	}
}

// flush stores the buffered results as the chunk's next part; end moves
// on to the next chunk.
func (s *storeSink) flush(end bool) {
	if s.inBuf > 0 && s.err == nil {
		if err := s.store(partKey(s.j.rec.ID, s.chunk, s.part), s.buf); err != nil {
			s.err = err
			why := "skipped: results could not be stored: " + err.Error()
			s.rn.unrecorded.Store(&why)
			s.buf = nil
			return
		}
		s.stored += s.inBuf
		s.inBuf = 0
		s.part++
		if cap(s.buf) > 2*partSize {
			s.buf = nil // one large answer does not keep its buffer for the job's life
		} else {
			s.buf = s.buf[:0]
		}
		s.progress()
	}
	if end {
		s.chunk, s.part, s.n = s.chunk+1, 0, 0
	}
}

// store writes a part, trying again while the job goes on.
func (s *storeSink) store(key string, val []byte) error {
	wait := storeRetry
	for attempt := 1; ; attempt++ {
		err := s.j.h.storage.Store(s.ctx, key, val)
		if err == nil || attempt == storeAttempts || !sleepCtx(s.stop, wait) {
			return err
		}
		wait *= 2
	}
}

// progress records how far the job is, and tells the webhook if asked.
func (s *storeSink) progress() {
	t := now()
	s.j.mu.Lock()
	s.j.rec.UpdatedAt = &t
	s.j.mu.Unlock()
	if err := s.j.save(s.ctx); err != nil {
		// Not fatal: the results are stored, and the end is retried.
		s.j.h.logger.Warn("storing async batch progress", zap.String("id", s.j.rec.ID), zap.Error(err))
	}
	if wh := s.j.h.Async.Webhook; wh != nil && wh.wants("progress") && t.Sub(s.lastProgress) >= time.Duration(wh.ProgressInterval) {
		s.lastProgress = t
		s.j.h.notify(s.j.h.pool, "progress", s.j.snapshot().progress)
	}
}

func (s *storeSink) close(summary) { s.flush(true) }

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

func (h *Handler) deleteExpired(ctx context.Context) {
	keys, err := h.storage.List(ctx, jobsPrefix, false)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			h.logger.Warn("listing batch jobs", zap.Error(err))
		}
		return
	}
	for _, k := range keys {
		id := path.Base(k)
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
