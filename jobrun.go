package batch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// job is an async batch this process has queued or runs, or has run and
// not yet recorded as ended.
type job struct {
	a *asyncJobs
	// endpoint is where the job was submitted: once it starts, it runs
	// through the handler serving there then, of a newer config if one
	// has been loaded since.
	endpoint string
	spec     *jobSpec
	// lease is this instance's hold on the job in storage, kept until
	// the job ends or is handed over; nil for one that waits in the
	// cluster's queue.
	lease *lease

	// event is what the webhook is to be told of the job's end.
	event *webhookEvent
	// reserved is set while the job holds a place in the queue that it
	// has not taken yet (submit).
	reserved bool

	// canceled stops the job at the next operation it would start.
	canceled atomic.Bool
	// unrecorded, once set, stops the job, whose results storage no
	// longer takes, at the next operation it would start; it says why.
	unrecorded atomic.Pointer[string]
	// windowEnd is when the job's completion window ends, set as it
	// starts to run: no operation starts after it.
	windowEnd time.Time

	// readable is the record as of the last results stored: readers
	// of results read those it counts.
	readable atomic.Pointer[jobRecord]

	mu  sync.Mutex
	rn  *runner // nil once the job has ended: its batch and credentials go
	rec jobRecord
}

// jobControl is what the runner of a job learns of it; nil for a batch.
type jobControl interface {
	// halted says why no more operations start ("" while they may).
	halted() string
	// handingOver reports whether no more operations start because the
	// instance is shutting down and another one resumes the job.
	handingOver() bool
	// resumable reports whether another instance can resume the job.
	resumable() bool
}

func (j *job) halted() string {
	if j.canceled.Load() {
		return "skipped: batch canceled"
	}
	if why := j.unrecorded.Load(); why != nil {
		return *why
	}
	if !j.windowEnd.IsZero() && !now().Before(j.windowEnd) {
		return errWindowSkip
	}
	return ""
}

// The errors of the operations of a job whose completion window passed:
// those not started are skipped (424), those in flight cut off (504).
const (
	errWindowSkip = "skipped: the job's completion window has passed"
	errWindowCut  = "cut off: the job's completion window passed while it ran"
)

// errWindowPassed is the cause with which a job's context ends at the end
// of its completion window.
var errWindowPassed = errors.New("the job's completion window has passed")

func (j *job) handingOver() bool { return j.resumable() && j.a.pool.draining.Load() }

// leaseLost reports whether another instance took the job over.
func (j *job) leaseLost() bool { return j.lease != nil && j.lease.lost() }

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
	return j.a.store.Store(ctx, jobKey(rec.ID, "job"), buf)
}

// requestCancel stops the job at the next operation it would start.
func (j *job) requestCancel() {
	j.canceled.Store(true)
}

// resumable reports whether another instance can take the job over: what
// its operations inherit is stored, or nothing.
func (j *job) resumable() bool { return !j.spec.Local }

// run runs one job to its end, or until it is handed over, and records
// it.
func (p *jobPool) run(j *job) {
	defer p.wg.Done()
	defer p.release()
	a, rn := j.a, j.rn
	if j.leaseLost() {
		p.forget(j) // given up while it waited: another instance has it
		return
	}
	if !now().Before(j.rec.ExpiresAt) {
		// Its id already answers 404: it must not run either.
		p.expire(j)
		return
	}
	// A job whose window has passed runs on, and skips every operation
	// before it is sent: its results say so, and it ends expired.
	j.windowEnd = j.rec.windowEnd()
	if ep, ok := p.endpointAt(j.endpoint); ok && ep.h != rn.h {
		// Reloaded while the job waited: it runs through the new config
		// (its record stays where it was submitted).
		rn.h, rn.next, rn.srv = ep.h, ep.next, ep.srv
		rn.logs = rn.accessLoggers()
		rn.refs.reset(ep.h.MaxReferenceSize)
	}
	base, endRun := context.WithCancel(p.ctx)
	defer endRun() // and with it the lease's watch
	if j.lease != nil {
		// Another instance took the job over: this one stops at once.
		base = j.lease.watch(base)
	}
	// The window ends the operations; reading the job's operations (to
	// skip them) and storing their results go on.
	ctx, cancel := context.WithDeadlineCause(base, j.windowEnd, errWindowPassed)
	defer cancel()
	started := now()
	rn.base = ctx
	rn.job = j
	if rn.b == nil { // until its operations are loaded
		rn.b = &batch{format: formatNamed(j.rec.Format), mode: j.spec.Mode, atomicity: j.spec.Atomicity}
	}
	if a.store.Exists(base, jobKey(j.rec.ID, "cancel")) {
		j.canceled.Store(true) // while it waited for an instance
	}
	// Storage writes outlive a shutdown's cancel: the record must say how
	// the job ended.
	store := context.WithoutCancel(base)

	j.mu.Lock()
	j.rec.Status, j.rec.UpdatedAt = stateRunning, &started
	if j.rec.StartedAt == nil {
		j.rec.StartedAt = &started
	}
	resumed := j.rec.Completed > 0
	j.mu.Unlock()
	if err := j.save(store); err != nil {
		a.logger.Error("storing async batch", zap.String("id", j.rec.ID), zap.Error(err))
	}
	a.metrics.jobs.WithLabelValues(stateRunning).Inc()
	a.logger.Info("async batch started", zap.String("id", j.rec.ID), zap.Int("operations", j.rec.Total),
		zap.Bool("resumed", resumed), zap.Int("from", j.rec.Completed))

	stopWatch := j.watchCancel(base, rn)
	sink := &storeSink{j: j, rn: rn, ctx: store, stop: base}
	err := sink.resume()
	if err == nil {
		err = j.runOps(base, rn, sink)
	}
	sink.close(summary{})
	stopWatch()

	switch {
	case j.lease != nil && j.lease.lost():
		// Another instance runs it now, and records it: nothing more is
		// this one's to say.
		a.logger.Warn("async batch taken over by another instance", zap.String("id", j.rec.ID))
		p.forget(j)
		return
	case j.resumable() && p.draining.Load() && sink.err == nil && sink.stored < j.rec.Total &&
		!j.canceled.Load() && (err == nil || base.Err() != nil):
		p.handOff(j, store)
		return
	}

	// A new variable: readers hold pointers to the last one.
	ended := now()
	j.mu.Lock()
	j.rec.UpdatedAt, j.rec.CompletedAt = &ended, &ended
	j.rec.ExpiresAt = ended.Add(time.Duration(a.cfg.Retention))
	j.rec.Rate, j.rec.EstimatedCompletionAt = 0, nil
	j.rec.Unstored = j.rec.Completed - sink.stored
	switch {
	case err != nil:
		j.rec.Status, j.rec.Error = stateError, cut(err.Error(), maxEcho*4)
	case sink.err != nil:
		j.rec.Status, j.rec.Error = stateError, "storing results: "+sink.err.Error()
	case errors.Is(context.Cause(base), errInterrupted):
		j.rec.Status, j.rec.Error = stateError, "interrupted"
	case j.canceled.Load():
		j.rec.Status = stateCanceled
	case j.rec.StopReason != "":
		j.rec.Status = stateStopped
	case j.rec.WindowPassed:
		j.rec.Status = stateExpired
	default:
		j.rec.Status = stateCompleted
	}
	sum := j.summary(rn)
	j.rec.Outcome = sum.status
	// Counted before any reader can see the job ended.
	a.metrics.jobs.WithLabelValues(j.rec.Status).Inc()
	rec := j.rec
	j.rn = nil
	j.mu.Unlock()
	rn.recordBatch(sum, ended.Sub(*rec.StartedAt))
	rn.logEnd(sum, ended.Sub(*rec.StartedAt))
	// Stored before the end is: an instance that finds the job ended finds
	// the event it owes too.
	if j.event = a.endEvent(rec); j.event != nil {
		if err := a.store.storeEvent(store, rec.ID, j.event); err != nil {
			a.logger.Error("storing the webhook event of an async batch", zap.String("id", rec.ID), zap.Error(err))
		}
	}
	if err := j.save(store); err != nil {
		a.logger.Error("storing the end of an async batch; retrying", zap.String("id", rec.ID), zap.Error(err))
		p.wg.Add(1)
		go p.saveLater(j)
	} else {
		p.ended(j)
	}
	a.logger.Info("async batch ended", zap.String("id", rec.ID), zap.String("status", rec.Status),
		zap.String("outcome", rec.Outcome), zap.String("error", rec.Error))
}

// runOps runs the job's operations from the first without a stored
// result, until all have run or the job is handed over.
func (j *job) runOps(ctx context.Context, rn *runner, sink *storeSink) error {
	if j.spec.Shape == shapeBody {
		return j.runWhole(ctx, rn, sink)
	}
	from := sink.stored
	if j.rec.Stopped != "" {
		rn.stoppedBy = j.rec.Stopped // stop_on_error stopped it before
	}
	chunks := j.readChunks(ctx, from)
	defer chunks.close()
	first, err := chunks.chunk()
	if err != nil || first == nil {
		return err
	}
	rn.load(first) // the options every chunk of the job shares
	j.seedBudget(rn)
	return rn.runStream(chunks, sink, from)
}

// runWhole runs a job stored whole, as the one batch it was sent as: from
// the first operation without a stored result, the answers of those before
// it read back when later ones depend on them.
func (j *job) runWhole(ctx context.Context, rn *runner, sink *storeSink) error {
	from := sink.stored
	b, err := j.a.loadChunk(ctx, j.spec, j.rec.ID, j.rec.Format, 0, 0)
	if err != nil {
		return err
	}
	if from > len(b.ops) {
		return fmt.Errorf("%w: %d results stored of %d operations", errBadRecord, from, len(b.ops))
	}
	rn.load(b)
	j.seedBudget(rn)
	if from > 0 {
		if err := j.a.loadEarlier(ctx, j.rec, rn, from); err != nil {
			return err
		}
	}
	if j.rec.Stopped != "" {
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
	return nil
}

// chunkReader reads the chunks of a streamed job's operations in order,
// ahead of the operations that run: at most chunksAhead wait decoded, so
// that storage is not on the operations' path.
type chunkReader struct {
	ready chan loadedChunk
	stop  context.CancelFunc
	done  chan struct{}
	cur   []*operation
	err   error
}

type loadedChunk struct {
	b   *batch
	err error
}

// chunksAhead is how many chunks are read before they are needed.
const chunksAhead = 2

// readChunks starts reading the chunks from the one that holds operation
// from, whose operations before from are passed over.
func (j *job) readChunks(ctx context.Context, from int) *chunkReader {
	ctx, stop := context.WithCancel(ctx)
	cr := &chunkReader{ready: make(chan loadedChunk, chunksAhead), stop: stop, done: make(chan struct{})}
	spec := j.spec
	go func() {
		defer close(cr.done)
		defer close(cr.ready)
		for c := chunkOf(spec.Starts, from); c < len(spec.Starts); c++ {
			first := spec.Starts[c]
			b, err := j.a.loadChunk(ctx, spec, j.rec.ID, j.rec.Format, c, first)
			if err == nil && from > first {
				b.ops = b.ops[min(from-first, len(b.ops)):]
			}
			select {
			case cr.ready <- loadedChunk{b, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return cr
}

// chunk returns the next chunk to run, whose operations next then yields;
// nil with no error when there is none.
func (cr *chunkReader) chunk() (*batch, error) {
	lc, ok := <-cr.ready
	if !ok {
		return nil, nil
	}
	if lc.err != nil {
		cr.err = lc.err
		return nil, lc.err
	}
	cr.cur = lc.b.ops
	return lc.b, nil
}

// next returns the job's next operation, nil at the end.
func (cr *chunkReader) next() (*operation, error) {
	for len(cr.cur) == 0 {
		if cr.err != nil {
			return nil, cr.err
		}
		if b, err := cr.chunk(); b == nil {
			return nil, err
		}
	}
	op := cr.cur[0]
	cr.cur = cr.cur[1:]
	return op, nil
}

// close stops reading, and waits for the reader to end.
func (cr *chunkReader) close() {
	cr.stop()
	<-cr.done
}

// chunkOf returns the chunk that holds operation i.
func chunkOf(starts []int, i int) int {
	c, _ := slices.BinarySearch(starts, i+1)
	return max(c-1, 0)
}

// seedBudget starts the failure budget from what the job's stored record
// counts: a job resumed, or run on after a hand-over, spends it where it
// was.
func (j *job) seedBudget(rn *runner) {
	rec := j.snapshot()
	failed := rec.Failed - rec.Tested
	rn.budget.seed(failed, rec.Succeeded+failed)
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
	case r.StopReason == stopFailureBudget:
		s.status = statusStopped
	case r.WindowPassed:
		s.status = statusExpired
	case r.Completed == r.Succeeded+r.Unmet && r.Completed == r.Total:
		s.status = statusCompleted
	default:
		s.status = statusCompletedWithErrors
	}
	return s
}

// handOff leaves a job that has not ended to the instance that resumes it:
// its record says how far it is, and it goes back to the cluster's queue,
// at its place among its owner's jobs.
func (p *jobPool) handOff(j *job, ctx context.Context) {
	t := now()
	j.mu.Lock()
	j.rec.Status, j.rec.UpdatedAt = stateQueued, &t
	j.rec.Rate, j.rec.EstimatedCompletionAt = 0, nil
	rec := j.rec
	j.mu.Unlock()
	err := j.save(ctx)
	if err == nil {
		err = j.a.store.enqueue(ctx, rec)
	}
	switch {
	case err != nil:
		// Held still, it is taken over once this instance's heartbeat
		// expires, and resumes from the last part of results the record
		// counts.
		j.a.logger.Error("storing an async batch handed over", zap.String("id", rec.ID), zap.Error(err))
	case j.lease != nil:
		j.lease.release(ctx)
	}
	p.forget(j)
	j.a.logger.Info("async batch handed over", zap.String("id", rec.ID), zap.Int("completed", rec.Completed))
}

// ended drops a job whose end is stored, once the webhook has been told.
func (p *jobPool) ended(j *job) {
	p.forget(j)
	if j.event != nil {
		j.a.sendEnd(p, j.rec.ID, j.lease, j.event)
		return
	}
	if j.lease != nil {
		j.lease.release(context.Background())
	}
}

// expire ends a job whose retention passed before it started (one whose
// window passed runs, and skips everything): it does not run, and what
// storage holds of it goes.
func (p *jobPool) expire(j *job) {
	a := j.a
	t := now()
	j.mu.Lock()
	j.rec.Status, j.rec.Error, j.rec.UpdatedAt, j.rec.CompletedAt = stateError, "expired before it started", &t, &t
	rec := j.rec
	j.rn = nil
	j.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	p.ended(j)
	if err := deleteTree(ctx, a.store, jobKey(rec.ID)); err != nil {
		a.logger.Warn("deleting expired batch job", zap.String("id", rec.ID), zap.Error(err))
	}
	a.store.unindexJob(ctx, &rec)
	a.metrics.jobs.WithLabelValues(stateError).Inc()
	a.logger.Warn("async batch expired before it started", zap.String("id", rec.ID))
	if ev := a.endEvent(rec); ev != nil {
		a.sendEnd(p, rec.ID, nil, ev) // at most once: nothing of the job is kept
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
			j.a.logger.Error("async batch expired before its end could be stored", zap.String("id", j.rec.ID))
			p.ended(j)
			return
		}
		last := !sleepCtx(p.ctx, min(wait, left))
		ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
		err := j.save(ctx)
		cancel()
		if err == nil {
			j.a.logger.Info("stored the end of an async batch", zap.String("id", j.rec.ID))
			p.ended(j)
			return
		}
		if last {
			// Its holder's heartbeat then expires, and the instance that
			// takes it over finds it where its last stored record says.
			j.a.logger.Error("storing the end of an async batch: giving up at shutdown", zap.String("id", j.rec.ID), zap.Error(err))
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
				if j.a.store.Exists(ctx, jobKey(j.rec.ID, "cancel")) {
					j.canceled.Store(true)
					return
				}
			}
		}
	}()
	return stop
}

// cancelPoll is how often a running job looks for a cancel request.
var cancelPoll = time.Second

// loadChunk loads chunk n of a job's operations and decodes it as the
// batch it runs as, with its operations numbered from first.
func (a *asyncJobs) loadChunk(ctx context.Context, spec *jobSpec, id, format string, n, first int) (*batch, error) {
	buf, err := a.store.loadChunk(ctx, spec, id, n)
	if err != nil {
		return nil, err
	}
	lim := a.h.rules
	lim.maxOps = max(lim.maxOps, opsPerChunk)
	lim.firstID = first
	lim.sources = spec.RetryOf != ""
	req := (&http.Request{Method: http.MethodPost, URL: &url.URL{Path: spec.Path},
		Header: http.Header{"Content-Type": {spec.ContentType}}}).WithContext(ctx)
	var b *batch
	switch spec.Shape {
	case shapeBody:
		f := formatNamed(format)
		if f == nil {
			return nil, fmt.Errorf("unknown format %q", format)
		}
		if b, err = f.decode(req, buf, &lim); err == nil {
			b.format = f
		}
	case shapeOps, shapeItems:
		b, err = parseChunk(ctx, spec, buf, &lim)
	default:
		err = fmt.Errorf("%w: shape %q", errBadRecord, spec.Shape)
	}
	if err != nil {
		return nil, fmt.Errorf("operations no longer valid: %w", err)
	}
	b.async = true
	return b, nil
}

// parseChunk decodes a chunk of a streamed job: the operations, or the
// bulk items, of one batch with the job's options.
func parseChunk(ctx context.Context, spec *jobSpec, chunk []byte, lim *rules) (*batch, error) {
	var body []byte
	if spec.Shape == shapeItems {
		body = append(append(append(append([]byte(`{"operation":`), spec.Template...), `,"items":`...), chunk...), '}')
	} else {
		body = append(append([]byte(`{"batch":`), chunk...), '}')
	}
	lim.mode, lim.atomicity = spec.Mode, spec.Atomicity
	b, err := parseBatch(ctx, body, lim)
	if err != nil {
		return nil, err
	}
	b.format = native
	b.lean = leanOptions{omitSuccess: spec.OmitSuccess, noHeaders: spec.NoHeaders}
	b.maxAttempts = spec.MaxAttempts
	b.keyConcurrency = spec.KeyConcurrency
	b.maxFailures, b.maxFailureRate = spec.MaxFailures, spec.MaxFailureRate
	return b, nil
}

// failJob ends a job that cannot run, and says why.
func (a *asyncJobs) failJob(j *job, why string) {
	t := now()
	j.rec.Status, j.rec.Error, j.rec.UpdatedAt, j.rec.CompletedAt = stateError, why, &t, &t
	j.rec.ExpiresAt = t.Add(time.Duration(a.cfg.Retention))
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	if j.event = a.endEvent(j.rec); j.event != nil {
		if err := a.store.storeEvent(ctx, j.rec.ID, j.event); err != nil {
			a.logger.Error("storing the webhook event of an async batch", zap.String("id", j.rec.ID), zap.Error(err))
		}
	}
	if err := j.save(ctx); err != nil {
		a.logger.Error("storing the end of an async batch", zap.String("id", j.rec.ID), zap.Error(err))
	}
	a.metrics.jobs.WithLabelValues(stateError).Inc()
	a.logger.Error("async batch ended", zap.String("id", j.rec.ID), zap.String("status", stateError), zap.String("error", why))
	a.pool.ended(j)
}

// loadEarlier reads back the stored results of the first n operations of
// the job rn runs whole, when what comes after depends on them or refers
// to them.
func (a *asyncJobs) loadEarlier(ctx context.Context, rec jobRecord, rn *runner, n int) error {
	if !slices.ContainsFunc(rn.b.ops[n:], func(op *operation) bool { return len(op.deps) > 0 || op.refs != nil }) {
		return nil
	}
	err := a.store.storedRange(ctx, rec, 0, n, func(i int, item []byte) bool {
		_, res := decodeStored(item)
		if res.body != nil && !res.isJSON {
			res.isJSON = jsonBody(res.header, res.body)
		}
		rn.results[i] = res
		return true
	})
	return err
}
