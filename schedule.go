package batch

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

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
	deps := slices.ContainsFunc(rn.b.ops, func(op *operation) bool { return len(op.deps) > 0 })
	// Without dependencies, operations start in array order: keys hold
	// none back unless more may run at once than one key may.
	keys := (deps || workers > rn.keyConcurrency()) && slices.ContainsFunc(rn.b.ops[from:], func(op *operation) bool { return op.key != "" })
	if !deps && !keys {
		rn.runIndependent(workers, from)
		return
	}
	rn.runGraph(workers, from, keys)
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

// runGraph runs operations with dependencies, or keys, on a pool of
// workers; this goroutine alone schedules and emits, so results need no
// lock.
func (rn *runner) runGraph(workers, from int, keys bool) {
	ops := rn.b.ops
	n := len(ops)
	jobs := make(chan int)
	done := make(chan int, workers) // never blocks a worker: at most workers in flight
	for range workers {
		go func() {
			clk := rn.newClock(rn.ctx)
			defer clk.stop()
			for i := range jobs {
				rn.results[i] = rn.runOne(ops[i], clk)
				done <- i
			}
		}()
	}
	defer close(jobs)

	// pending counts unfinished dependencies, and the operation before
	// of the same key until it starts; ready holds runnable indexes in
	// array order, so that with no dependencies ops start in order.
	// Operations before from have finished.
	pending := make([]int, n)
	dependents := make([][]int, n)
	for i := from; i < n; i++ {
		for _, d := range ops[i].deps {
			if d >= from {
				pending[i]++
				dependents[d] = append(dependents[d], i)
			}
		}
	}
	// keyNext is the next operation of each one's key, -1 for none: an
	// operation is ready once the one before it of its key has started,
	// so that a key's operations are offered their turns in array order.
	// The parser refuses dependencies that would have an operation wait
	// for a later one of its key.
	var keyNext []int
	var turns *keyTurns
	if keys {
		keyNext = make([]int, n)
		for i := range keyNext {
			keyNext[i] = -1
		}
		for i, p := range keyOrder(rn.b) {
			if p >= from {
				keyNext[p] = i
				pending[i]++
			}
		}
		turns = newKeyTurns(rn.keyConcurrency())
	}
	ready := make([]int, 0, n)
	for i := from; i < n; i++ {
		if pending[i] == 0 {
			ready = append(ready, i)
		}
	}
	var turned []int // handed the turn of an operation of their key that ended
	inFlight, finished := 0, from
	start := func(i int) {
		jobs <- i
		inFlight++
		if keyNext != nil {
			if j := keyNext[i]; j >= 0 {
				if pending[j]--; pending[j] == 0 {
					ready = append(ready, j)
				}
			}
		}
	}
	for finished < n {
		for inFlight < workers && !rn.handingOver() {
			if len(turned) > 0 {
				start(turned[0])
				turned = turned[1:]
				continue
			}
			if len(ready) == 0 {
				break
			}
			i := ready[0]
			ready = ready[1:]
			if turns == nil || ops[i].key == "" || turns.offer(ops[i].key, i) {
				start(i)
			}
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
		if turns != nil && ops[i].key != "" {
			if j := turns.done(ops[i].key); j >= 0 {
				turned = append(turned, j)
			}
		}
	}
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
		if res.failed() {
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
			undone = !rr.failed()
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

// A streamed job's operations run as one stream across its chunks: the
// next chunk is read while the current one runs, and results go out in
// order behind them. A slow operation holds back only the operations past
// the window of results that may wait for it.
//
// An operation whose key has key_concurrency operations running, or one
// waiting before it, waits in the window for its turn, and the stream
// reads on past it: other keys' operations behind it start on free
// workers. A key's operations in a later chunk come later in the stream,
// so they never overtake its earlier ones. At the limit, a key whose
// operations wait behind a slow one of its own fill the window as results
// held behind a slow operation do: once the first operation whose result
// has not gone out is streamWindow behind the next to read, no more is
// read, and the job goes at that key's pace until its operations drain
// out of the window. Spread over the stream, a key's operations take a
// few places in it each, and the other keys run on.
const (
	// streamWindow bounds the operations started past the first whose
	// result has not gone out.
	streamWindow = 2 * opsPerChunk
	// streamHeld bounds the bytes of answers that wait for an earlier
	// operation's, before more operations start.
	streamHeld = 64 << 20
)

// opSource yields a job's operations in order; nil at the end.
type opSource interface {
	next() (*operation, error)
}

// runStream runs the operations src yields, the first of them operation
// from of the job, and passes their results to out in order; it does not
// close out. It stops taking operations when the job is handed over.
func (rn *runner) runStream(src opSource, out sink, from int) error {
	workers := 1
	if rn.b.mode == modeParallel {
		workers = rn.h.Concurrency
	}
	type slot struct {
		op   *operation
		res  result
		done bool
	}
	ring := make([]slot, streamWindow)
	jobs := make(chan int)
	done := make(chan int, workers) // never blocks a worker: at most workers in flight
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			clk := rn.newClock(rn.ctx)
			defer clk.stop()
			for i := range jobs {
				s := &ring[i%streamWindow]
				s.res = rn.runOne(s.op, clk)
				s.res.w = nil // the writer is not reused: results wait in the ring
				done <- i
			}
		})
	}
	defer wg.Wait()
	defer close(jobs)

	// turns holds the operations that wait for their key: those in the
	// window, so never more than streamWindow. With no more workers than
	// one key may use, none ever waits.
	var turns *keyTurns
	if workers > rn.keyConcurrency() {
		turns = newKeyTurns(rn.keyConcurrency())
	}
	var classes [6]int
	next, emit, inFlight, held := from, from, 0, 0
	start := func(i int) {
		jobs <- i
		inFlight++
	}
	var err error
	for {
		for err == nil && src != nil && inFlight < workers && next-emit < streamWindow && held <= streamHeld && !rn.handingOver() {
			op, e := src.next()
			if e != nil || op == nil {
				err, src = e, nil
				break
			}
			ring[next%streamWindow] = slot{op: op}
			if turns == nil || op.key == "" || turns.offer(op.key, next) {
				start(next)
			}
			next++
		}
		if inFlight == 0 {
			break // all done, handed over, or the operations could not be read
		}
		i := <-done
		inFlight--
		s := &ring[i%streamWindow]
		s.done = true
		held += len(s.res.body)
		if turns != nil && s.op.key != "" {
			// What waits when the job is handed over does not start: the
			// instance that resumes it runs it.
			if j := turns.done(s.op.key); j >= 0 && !rn.handingOver() {
				start(j)
			}
		}
		for emit < next && ring[emit%streamWindow].done {
			s := &ring[emit%streamWindow]
			held -= len(s.res.body)
			if st := s.res.status; st != 0 {
				classes[min(st/100, 5)]++
			}
			out.put(emit, s.op, &s.res)
			*s = slot{}
			emit++
		}
	}
	rn.countOps(classes)
	return err
}
