package batch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-batch/batch/internal/pace"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// newBatchID returns 128 random bits in hex.
func newBatchID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// runner runs one validated batch.
type runner struct {
	h         *Handler
	b         *batch
	id        string
	next      caddyhttp.Handler
	srv       *caddyhttp.Server
	conn      connFacts
	ctx       context.Context // ends with the batch: timeout, client gone, shutdown
	base      context.Context // ctx without the batch it runs
	timeout   time.Duration   // what bounds ctx, for messages
	inherited http.Header     // headers every operation starts from
	results   []result
	out       *emitter
	stoppedAt int // index of the op that stopped the batch, or -1
	// stoppedBy is the id of the operation that stopped the batch; a job
	// carries it from the part of its operations that stopped into those
	// after.
	stoppedBy string
	// handover, set for a job that another instance can resume, stops it
	// at the next operation it would start once true: the instance is
	// shutting down, and hands the rest over.
	handover *atomic.Bool
	// rollbackFailed is set when a rollback failed.
	rollbackFailed atomic.Bool
	// groupFailed holds, for each atomicity group, the index of the
	// operation that failed it, or -1.
	groupFailed []int
	// rollbacks bounds all rollbacks of the batch together, from the
	// first: the handler's timeout, once more.
	rollbacks     context.Context
	rollbacksOnce sync.Once
	stopRollbacks context.CancelFunc
	// canceled stops an async job at the next operation it would start.
	canceled atomic.Bool
	// unrecorded, once set, stops an async job whose results storage no
	// longer takes at the next operation it would start; it says why.
	unrecorded atomic.Pointer[string]
	// logs are the access loggers operations are logged to; nil for none.
	logs []*zap.Logger
	// refs is what filling in references may still cost.
	refs refBudget
	// opKey is the header that carries each operation's idempotency key,
	// "<batch id>.<op id>", unless the operation has its own; "" for none.
	opKey string
	// pace is who the operations wait as for a turn downstream; a job's
	// is made at its first operation.
	pace     *pace.Owner
	paceOnce sync.Once
}

func (h *Handler) newRunner(ctx context.Context, timeout time.Duration, r *http.Request, next caddyhttp.Handler, srv *caddyhttp.Server, b *batch) *runner {
	rn := &runner{
		h:         h,
		b:         b,
		id:        newBatchID(),
		next:      next,
		srv:       srv,
		conn:      connFactsOf(r),
		base:      ctx,
		timeout:   timeout,
		inherited: h.inheritedHeaders(r.Header),
		pace:      h.batchPaceOwner(r),
	}
	rn.start(b)
	rn.refs.reset(h.MaxReferenceSize)
	if srv != nil {
		rn.logs = rn.accessLoggers()
	}
	// The batch request's own log entry may name the batch (log_append).
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		repl.Set("http.batch.id", rn.id)
	}
	return rn
}

// start makes b the operations the runner runs next: a whole batch, or a
// part of a job's operations.
func (rn *runner) start(b *batch) {
	rn.b = b
	rn.ctx = context.WithValue(rn.base, batchCtxKey, b)
	rn.results = make([]result, len(b.ops))
	rn.stoppedAt = -1
	rn.groupFailed = nil
	if len(b.groups) > 0 {
		rn.groupFailed = make([]int, len(b.groups))
		for g := range rn.groupFailed {
			rn.groupFailed[g] = -1
		}
	}
}

// execute runs the batch, writing its results to out, and logs it.
func (rn *runner) execute(out sink) summary {
	start := time.Now()
	rn.runFrom(out, 0)
	sum := rn.out.finish(rn.summary())
	rn.record(sum, time.Since(start))
	rn.logBatch(sum, time.Since(start))
	return sum
}

// logBatch writes the line of a batch, or a job, that has ended.
func (rn *runner) logBatch(sum summary, took time.Duration) {
	b := rn.b
	format := "native"
	if b.format != nil {
		format = b.format.name()
	}
	rn.h.logger.Info("batch",
		zap.String("id", rn.id),
		zap.String("format", format),
		zap.Int("operations", sum.total),
		zap.String("mode", b.mode),
		zap.String("atomicity", b.atomicity),
		zap.Duration("duration", took),
		zap.String("status", sum.status),
		zap.Int("succeeded", sum.succeeded),
		zap.Int("failed", sum.failed),
		zap.Int("skipped", sum.skipped),
	)
}

// runFrom runs the operations of rn.b from index from, those before it
// having their results already, and passes the results to out as they are
// final; it does not close out.
func (rn *runner) runFrom(out sink, from int) {
	b := rn.b
	rn.out = newEmitter(out, b, rn.results)
	rn.out.next = from
	for i := range from {
		rn.out.done[i] = true
	}
	// Under all_or_nothing, and in an atomicity group, a later failure
	// changes earlier results.
	rn.out.hold = b.atomicity == atomicAllOrNothing || len(b.groups) > 0

	if b.mode == modeParallel && len(b.ops)-from > 1 {
		rn.runParallel(from)
	} else {
		rn.runSequential(from)
	}
	if b.atomicity == atomicAllOrNothing && rn.stoppedAt >= 0 {
		rn.rollBack()
	}
	if rn.stopRollbacks != nil {
		rn.stopRollbacks()
	}
}

// handingOver reports whether no more operations start, as the job is
// handed over. Held results are not handed over: what they would undo
// lives only here, so such operations run on to the end or the grace.
func (rn *runner) handingOver() bool {
	return rn.handover != nil && rn.handover.Load() && !rn.out.hold
}

// handedOver reports whether a shutdown cut off a job another instance
// resumes: what its operations were cut off from is theirs to finish,
// and nothing is rolled back.
func (rn *runner) handedOver() bool {
	return rn.handover != nil && errors.Is(context.Cause(rn.ctx), errInterrupted)
}

// runSequential runs the operations in array order in the request's own
// goroutine.
func (rn *runner) runSequential(from int) {
	clk := rn.newClock(rn.ctx)
	defer clk.stop()
	for i := from; i < len(rn.b.ops) && !rn.handingOver(); i++ {
		op := rn.b.ops[i]
		rn.results[i] = rn.runOne(op, clk)
		w := rn.results[i].w
		rn.results[i].w = nil
		rn.out.ready(i)
		clk.recycle(w, op, !rn.out.hold)
	}
}

// runParallel runs operations on a pool of concurrency workers.
func (rn *runner) runParallel(from int) {
	workers := min(rn.h.Concurrency, len(rn.b.ops)-from)
	if !slices.ContainsFunc(rn.b.ops, func(op *operation) bool { return len(op.deps) > 0 }) {
		rn.runIndependent(workers, from)
		return
	}
	rn.runGraph(workers, from)
}

// runIndependent runs operations that wait for none: each worker takes the
// next index, in array order, and passes its result to the emitter itself,
// under a lock, so that an operation costs no hand-off between goroutines.
func (rn *runner) runIndependent(workers, from int) {
	var next atomic.Int64
	next.Store(int64(from))
	var mu sync.Mutex // the emitter's, and the results'
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			clk := rn.newClock(rn.ctx)
			defer clk.stop()
			for !rn.handingOver() {
				i := int(next.Add(1) - 1)
				if i >= len(rn.b.ops) {
					return
				}
				op := rn.b.ops[i]
				res := rn.runOne(op, clk)
				mu.Lock()
				rn.results[i] = res
				rn.out.ready(i)
				written := rn.out.next > i && !rn.out.hold
				mu.Unlock()
				clk.recycle(res.w, op, written)
			}
		})
	}
	wg.Wait()
}

// runGraph runs operations with dependencies on a pool of workers; this
// goroutine alone schedules and emits, so results need no lock.
func (rn *runner) runGraph(workers, from int) {
	n := len(rn.b.ops)
	jobs := make(chan int)
	done := make(chan int, workers) // never blocks a worker: at most workers in flight
	for range workers {
		go func() {
			clk := rn.newClock(rn.ctx)
			defer clk.stop()
			for i := range jobs {
				rn.results[i] = rn.runOne(rn.b.ops[i], clk)
				done <- i
			}
		}()
	}
	defer close(jobs)

	// pending counts unfinished dependencies; ready holds runnable indexes
	// in array order, so that with no dependencies ops start in order.
	// Operations before from have finished.
	pending := make([]int, n)
	dependents := make([][]int, n)
	ready := make([]int, 0, n)
	for i := from; i < n; i++ {
		for _, d := range rn.b.ops[i].deps {
			if d >= from {
				pending[i]++
				dependents[d] = append(dependents[d], i)
			}
		}
		if pending[i] == 0 {
			ready = append(ready, i)
		}
	}
	inFlight, finished := 0, from
	for finished < n {
		for inFlight < workers && len(ready) > 0 && !rn.handingOver() {
			jobs <- ready[0]
			ready = ready[1:]
			inFlight++
		}
		if inFlight == 0 {
			return // handed over
		}
		i := <-done
		inFlight--
		finished++
		rn.out.ready(i)
		for _, j := range dependents[i] {
			if pending[j]--; pending[j] == 0 {
				ready = append(ready, j)
			}
		}
	}
}

// runOne decides what becomes of one operation, and under atomicity
// whether the batch stops there: whatever failed it, a timeout, the client
// going away or a cancel included, the operations after it do not run and
// those before it are rolled back.
func (rn *runner) runOne(op *operation, clk *opClock) result {
	res := rn.decide(op, clk)
	if rn.b.atomicity != atomicNone && rn.stoppedAt < 0 && failed(&res) {
		rn.stoppedAt, rn.stoppedBy = op.index, op.id
	}
	if op.group != 0 && failed(&res) && rn.groupFailed[op.group-1] < 0 {
		// The group's operations run in order (each depends on the one
		// before), so those before op are final.
		rn.results[op.index] = res
		rn.failGroup(op)
	}
	return res
}

// decide runs op, or answers for it.
func (rn *runner) decide(op *operation, clk *opClock) result {
	if rn.ctx.Err() != nil {
		return rn.cutOff(rn.ctx)
	}
	if rn.canceled.Load() {
		return result{status: statusSkipped, err: "skipped: batch canceled"}
	}
	if why := rn.unrecorded.Load(); why != nil {
		return result{status: statusSkipped, err: *why}
	}
	if rn.stoppedBy != "" {
		return result{status: statusSkipped, err: "skipped: batch stopped at op " + rn.stoppedBy}
	}
	if g := op.group - 1; g >= 0 && rn.groupFailed[g] >= 0 {
		return result{status: statusSkipped, err: fmt.Sprintf("skipped: atomicity group %s failed at op %s", rn.b.groups[g].name, rn.b.ops[rn.groupFailed[g]].id)}
	}
	for _, d := range op.deps {
		if dep := &rn.results[d]; failed(dep) {
			return result{status: statusSkipped, err: fmt.Sprintf("dependency %s failed with status %d", rn.b.ops[d].id, dep.status)}
		}
		if g := rn.b.ops[d].group - 1; g >= 0 && g != op.group-1 && rn.groupFailed[g] >= 0 {
			return result{status: statusSkipped, err: fmt.Sprintf("dependency %s failed: atomicity group %s failed at op %s",
				rn.b.ops[d].id, rn.b.groups[g].name, rn.b.ops[rn.groupFailed[g]].id)}
		}
	}
	return rn.resolveAndExec(op, clk)
}

// errRollbackTimeout ends the rollbacks that did not finish within the
// batch's timeout of their own.
var errRollbackTimeout = errors.New("rollbacks timed out")

// rollBack runs, in reverse order, the rollback of every operation that
// succeeded before an all_or_nothing batch failed.
func (rn *runner) rollBack() {
	rn.rollBackOps(0, rn.stoppedAt)
}

// rollBackOps runs, in reverse order, the rollback of every operation
// from index from up to before index to that succeeded. Compensation runs
// even if the batch timed out or the client left, within the budget all
// rollbacks of the batch share.
func (rn *runner) rollBackOps(from, to int) {
	if rn.handedOver() {
		return
	}
	rn.rollbacksOnce.Do(func() {
		rn.rollbacks, rn.stopRollbacks = context.WithTimeoutCause(context.WithoutCancel(rn.ctx), time.Duration(rn.h.Timeout), errRollbackTimeout)
	})
	ctx := rn.rollbacks
	clk := rn.newClock(ctx)
	defer clk.stop()
	for i := to - 1; i >= from; i-- {
		res := &rn.results[i]
		if failed(res) {
			continue
		}
		undone := false
		if rb := rn.b.ops[i].rollback; rb != nil {
			var rr result
			if ctx.Err() != nil {
				rr = rn.cutOff(ctx)
			} else {
				rr = rn.resolveAndExec(rb, clk)
			}
			res.rollback = &rr
			undone = !failed(&rr)
			if !undone {
				rn.rollbackFailed.Store(true)
			}
		}
		res.undone = &undone
	}
}

// failGroup fails the atomicity group of op, which failed: what of it
// has not run is skipped, and what succeeded before op is rolled back.
func (rn *runner) failGroup(op *operation) {
	g := op.group - 1
	rn.groupFailed[g] = op.index
	rn.rollBackOps(rn.b.groups[g].ops[0], op.index)
}

// errInterrupted is the cause with which a shutdown cancels async jobs.
var errInterrupted = errors.New("interrupted")

// cutOff is the result of an operation that the end of ctx (the batch's,
// or its rollbacks') kept from finishing.
func (rn *runner) cutOff(ctx context.Context) result {
	switch cause := context.Cause(ctx); {
	case errors.Is(cause, errRollbackTimeout):
		return result{status: http.StatusGatewayTimeout, err: "rollbacks timed out after " + time.Duration(rn.h.Timeout).String(), cut: true}
	case errors.Is(cause, errInterrupted):
		return result{status: http.StatusServiceUnavailable, err: "interrupted: the server shut down", cut: true}
	case errors.Is(cause, context.DeadlineExceeded):
		return result{status: http.StatusGatewayTimeout, err: "batch timed out after " + rn.timeout.String(), cut: true}
	}
	return result{status: statusClientGone, err: "client went away", cut: true}
}
