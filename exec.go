package batch

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// batchCtxKey marks the context of a sub-request, so that a batch handler
// reached again from one refuses it.
type ctxKey struct{}

var batchCtxKey ctxKey

var errNestedBatch = errors.New("nested batch")

const errNestedBatchMsg = "nested batch: an operation may not target a batch endpoint"

// Statuses the batch layer gives operations it did not let the chain answer.
const (
	statusSkipped = http.StatusFailedDependency // 424: not run
	// statusClientGone marks operations cut off because the client left;
	// nobody reads them but logs (Caddy uses 499 the same way).
	statusClientGone = 499
)

// result is the answer of one operation.
type result struct {
	status int
	header http.Header
	body   []byte
	// err is set when the batch layer, not the handler chain, decided the
	// status.
	err string
	// Under all_or_nothing, for an operation that succeeded before the
	// batch failed: whether it was undone, and by what.
	undone   *bool
	rollback *result
	// attempts counts tries when retry_429 retried the operation.
	attempts int
	// cut is set when the batch's end (timeout, client gone, shutdown)
	// kept the operation from finishing.
	cut bool
	// isJSON is set when body is JSON that can be embedded as it is;
	// decided once, as references read it again.
	isJSON bool
	// w is the writer that holds header and body, for reuse once written.
	w *opWriter
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
	timeout   time.Duration   // what bounds ctx, for messages
	inherited http.Header     // headers every operation starts from
	results   []result
	out       *emitter
	stoppedAt int // index of the op that stopped the batch, or -1
	// rollbackFailed is set when a rollback of all_or_nothing failed.
	rollbackFailed bool
	// canceled stops an async job at the next operation it would start.
	canceled atomic.Bool
	// unrecorded, once set, stops an async job whose results storage no
	// longer takes at the next operation it would start; it says why.
	unrecorded atomic.Pointer[string]
	// refs is what filling in references may still cost.
	refs refBudget
}

// connFacts are what sub-requests take from the batch request: they speak
// for the same client over the same connection.
type connFacts struct {
	host, remoteAddr, path string
	proto                  string
	protoMajor, protoMinor int
	tls                    *tls.ConnectionState
}

func connFactsOf(r *http.Request) connFacts {
	return connFacts{
		host: r.Host, remoteAddr: r.RemoteAddr, path: r.URL.Path,
		proto: r.Proto, protoMajor: r.ProtoMajor, protoMinor: r.ProtoMinor,
		tls: r.TLS,
	}
}

// serverOf returns the server a request came through; sub-requests are
// prepared for it.
func serverOf(r *http.Request) (*caddyhttp.Server, error) {
	srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok {
		return nil, caddyhttp.Error(http.StatusInternalServerError, errors.New("batch handler is not running inside an HTTP server"))
	}
	return srv, nil
}

// run runs a batch for the client and answers it.
func (h *Handler) run(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, b *batch) (summary, error) {
	srv, err := serverOf(r)
	if err != nil {
		return summary{}, err
	}
	ctx, cancel := context.WithTimeout(r.Context(), time.Duration(h.Timeout))
	defer cancel()
	rn := h.newRunner(ctx, time.Duration(h.Timeout), r, next, srv, b)
	if wantsNDJSON(r) {
		b.lean.oneLine = true
		return rn.execute(&ndjsonSink{w: w, rc: http.NewResponseController(w)}), nil
	}
	return rn.execute(&httpSink{w: w, form: b.form}), nil
}

func (h *Handler) newRunner(ctx context.Context, timeout time.Duration, r *http.Request, next caddyhttp.Handler, srv *caddyhttp.Server, b *batch) *runner {
	rn := &runner{
		h:         h,
		b:         b,
		id:        newBatchID(),
		next:      next,
		srv:       srv,
		conn:      connFactsOf(r),
		ctx:       context.WithValue(ctx, batchCtxKey, b),
		timeout:   timeout,
		inherited: h.inheritedHeaders(r.Header),
		results:   make([]result, len(b.ops)),
		stoppedAt: -1,
	}
	rn.refs.reset(h.MaxReferenceSize)
	return rn
}

// execute runs the batch, writing its results to out, and logs it.
func (rn *runner) execute(out sink) summary {
	start := time.Now()
	b := rn.b
	rn.out = newEmitter(out, b, rn.results)
	// Under all_or_nothing a later failure changes earlier results.
	rn.out.hold = b.atomicity == atomicAllOrNothing

	if b.mode == modeParallel && len(b.ops) > 1 {
		rn.runParallel()
	} else {
		rn.runSequential()
	}
	if b.atomicity == atomicAllOrNothing && rn.stoppedAt >= 0 {
		rn.rollBack()
	}
	sum := rn.out.finish(rn.summary())
	rn.record(sum, time.Since(start))

	rn.h.logger.Info("batch",
		zap.String("id", rn.id),
		zap.Int("operations", len(b.ops)),
		zap.String("mode", b.mode),
		zap.String("atomicity", b.atomicity),
		zap.Duration("duration", time.Since(start)),
		zap.String("status", sum.status),
		zap.Int("succeeded", sum.succeeded),
		zap.Int("failed", sum.failed),
		zap.Int("skipped", sum.skipped),
	)
	return sum
}

// record counts the batch in the metrics.
func (rn *runner) record(sum summary, took time.Duration) {
	m := rn.h.metrics
	m.batches.WithLabelValues(rn.b.mode, sum.status).Inc()
	m.size.Observe(float64(len(rn.results)))
	m.duration.WithLabelValues(rn.b.mode).Observe(took.Seconds())
	var classes [6]int
	for i := range rn.results {
		classes[min(rn.results[i].status/100, 5)]++
	}
	for c, n := range classes {
		if n > 0 {
			m.operations.WithLabelValues(statusClass(c * 100)).Add(float64(n))
		}
	}
}

// runSequential runs the operations in array order in the request's own
// goroutine.
func (rn *runner) runSequential() {
	clk := rn.newClock(rn.ctx)
	defer clk.stop()
	for i, op := range rn.b.ops {
		rn.results[i] = rn.runOne(op, clk)
		w := rn.results[i].w
		rn.results[i].w = nil
		rn.out.ready(i)
		clk.recycle(w, op, !rn.out.hold)
	}
}

// runParallel runs operations on a pool of concurrency workers.
func (rn *runner) runParallel() {
	n := len(rn.b.ops)
	workers := min(rn.h.Concurrency, n)
	if !slices.ContainsFunc(rn.b.ops, func(op *operation) bool { return len(op.deps) > 0 }) {
		rn.runIndependent(workers)
		return
	}
	rn.runGraph(workers)
}

// runIndependent runs operations that wait for none: each worker takes the
// next index, in array order, and passes its result to the emitter itself,
// under a lock, so that an operation costs no hand-off between goroutines.
func (rn *runner) runIndependent(workers int) {
	var next atomic.Int64
	var mu sync.Mutex // the emitter's, and the results'
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			clk := rn.newClock(rn.ctx)
			defer clk.stop()
			for {
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
func (rn *runner) runGraph(workers int) {
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
	pending := make([]int, n)
	dependents := make([][]int, n)
	ready := make([]int, 0, n)
	for i, op := range rn.b.ops {
		pending[i] = len(op.deps)
		for _, d := range op.deps {
			dependents[d] = append(dependents[d], i)
		}
		if pending[i] == 0 {
			ready = append(ready, i)
		}
	}
	inFlight, finished := 0, 0
	for finished < n {
		for inFlight < workers && len(ready) > 0 {
			jobs <- ready[0]
			ready = ready[1:]
			inFlight++
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
		rn.stoppedAt = op.index
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
	if rn.stoppedAt >= 0 {
		return result{status: statusSkipped, err: "skipped: batch stopped at op " + rn.b.ops[rn.stoppedAt].id}
	}
	for _, d := range op.deps {
		if dep := &rn.results[d]; failed(dep) {
			return result{status: statusSkipped, err: fmt.Sprintf("dependency %s failed with status %d", rn.b.ops[d].id, dep.status)}
		}
	}
	return rn.resolveAndExec(op, clk)
}

// resolveAndExec fills in op's references and runs it.
func (rn *runner) resolveAndExec(op *operation, clk *opClock) result {
	op, err := rn.resolve(op)
	if err != nil {
		return result{status: statusSkipped, err: err.Error()}
	}
	if strings.EqualFold(op.url.Path, rn.conn.path) {
		// The chain after batch would not bring it back here, but a client
		// who sends it means a batch inside a batch.
		return result{status: http.StatusBadRequest, err: errNestedBatchMsg}
	}
	return rn.exec(op, clk)
}

// errRollbackTimeout ends the rollbacks that did not finish within the
// batch's timeout of their own.
var errRollbackTimeout = errors.New("rollbacks timed out")

// rollBack runs, in reverse order, the rollback of every operation that
// succeeded before an all_or_nothing batch failed.
func (rn *runner) rollBack() {
	// Compensation must run even if the batch timed out or the client
	// left, within a budget of its own: the handler's timeout, once more.
	budget := time.Duration(rn.h.Timeout)
	ctx, cancel := context.WithTimeoutCause(context.WithoutCancel(rn.ctx), budget, errRollbackTimeout)
	defer cancel()
	clk := rn.newClock(ctx)
	defer clk.stop()
	for i := rn.stoppedAt - 1; i >= 0; i-- {
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
			rn.rollbackFailed = rn.rollbackFailed || !undone
		}
		res.undone = &undone
	}
}

// failed reports whether a finished operation counts as failed for those
// depending on it.
func failed(res *result) bool { return res.status >= 400 }

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

// exec serves one operation through the rest of the handler chain. An
// idempotent operation answered 429 is tried again after its Retry-After,
// up to retry_429 times within op_timeout.
func (rn *runner) exec(op *operation, clk *opClock) result {
	ctx, deadline := clk.arm()
	defer clk.disarm()
	for attempt := 1; ; attempt++ {
		res := rn.attempt(ctx, clk, op, attempt)
		if res.status != http.StatusTooManyRequests || attempt > rn.h.Retry429 || !idempotent(op.method) {
			if attempt > 1 {
				res.attempts = attempt
			}
			return res
		}
		wait, ok := retryAfter(res.header)
		if !ok {
			wait = time.Second // when the answer does not say, or not readably
		}
		if time.Until(deadline) < wait {
			res.attempts = attempt
			return res
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			res.attempts = attempt
			return res
		}
	}
}

// opClock is what a goroutine that runs operations one after another
// keeps between them: their contexts' clock, and a spare writer.
//
// Each operation's context ends when the operation does, at op_timeout,
// or with parent. It derives from parent's values without its
// cancelation, which one watch on parent passes on, and a timer that
// re-arms itself only when it fires checks the deadline: an operation
// costs one cancel context, not a timer and a registration with its
// parent.
type opClock struct {
	parent    context.Context
	detached  context.Context // parent's values, never canceled
	d         time.Duration
	stopWatch func() bool

	mu       sync.Mutex
	timer    *time.Timer
	pending  bool                    // timer will fire, at or before deadline
	cancel   context.CancelCauseFunc // of the armed operation, nil when none
	deadline time.Time

	// spare is a writer whose answer is written out and read by no
	// reference: the next operation takes it.
	spare *opWriter
}

// recycle makes w the spare when its answer is written out and no
// reference reads it.
func (c *opClock) recycle(w *opWriter, op *operation, written bool) {
	if w != nil && written && !op.keepHeader && !op.keepBody && cap(w.body) <= 64<<10 {
		c.spare = w
	}
}

// newClock returns a clock for operations bounded by parent and op_timeout.
func (rn *runner) newClock(parent context.Context) *opClock {
	c := &opClock{parent: parent, detached: context.WithoutCancel(parent), d: time.Duration(rn.h.OpTimeout)}
	c.stopWatch = context.AfterFunc(parent, c.parentDone)
	return c
}

// errOpTimeout is the cause with which an operation's context ends at
// op_timeout.
var errOpTimeout = errors.New("operation timed out")

// arm returns the context of the next operation, and when it times out.
func (c *opClock) arm() (context.Context, time.Time) {
	ctx, cancel := context.WithCancelCause(c.detached)
	deadline := time.Now().Add(c.d)
	c.mu.Lock()
	c.cancel, c.deadline = cancel, deadline
	// A pending timer was set for an earlier deadline; it re-arms itself
	// for this one when it fires.
	if !c.pending {
		c.pending = true
		if c.timer == nil {
			c.timer = time.AfterFunc(c.d, c.fire)
		} else {
			c.timer.Reset(c.d)
		}
	}
	c.mu.Unlock()
	// parentDone, if it ran before the cancel was set, found none.
	if c.parent.Err() != nil {
		cancel(context.Cause(c.parent))
	}
	return ctx, deadline
}

// disarm ends the armed operation's context.
func (c *opClock) disarm() {
	c.mu.Lock()
	cancel := c.cancel
	c.cancel = nil
	c.mu.Unlock()
	cancel(nil)
}

// fire ends the armed operation if its deadline has passed, or waits for
// that deadline.
func (c *opClock) fire() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pending = false
	if c.cancel == nil {
		return // idle: the next arm sets the timer
	}
	if left := time.Until(c.deadline); left > 0 {
		c.pending = true
		c.timer.Reset(left)
		return
	}
	c.cancel(errOpTimeout)
}

// parentDone ends the armed operation with parent's cause.
func (c *opClock) parentDone() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cancel != nil {
		c.cancel(context.Cause(c.parent))
	}
}

func (c *opClock) stop() {
	c.stopWatch()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.timer != nil {
		c.timer.Stop()
	}
	c.pending = false
}

// idempotent reports whether a method may be repeated without changing
// what one request would do (RFC 9110 §9.2.2).
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodPut, http.MethodDelete, http.MethodOptions:
		return true
	}
	return false
}

// maxRetryAfter caps what a Retry-After may ask for: no answer is a reason
// to wait longer, and more seconds than this could overflow a Duration.
const maxRetryAfter = 24 * time.Hour

// retryAfter reads a Retry-After header, delta-seconds or an HTTP-date, as
// a wait from now of at most maxRetryAfter; ok is false when there is none
// or it cannot be read.
func retryAfter(h http.Header) (wait time.Duration, ok bool) {
	v := strings.TrimSpace(h.Get("Retry-After"))
	if v == "" {
		return 0, false
	}
	if strings.Trim(v, "0123456789") == "" {
		// Only digits: ParseUint fails by range alone, which is long.
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil || n > uint64(maxRetryAfter/time.Second) {
			return maxRetryAfter, true
		}
		return time.Duration(n) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		return min(max(time.Until(t), 0), maxRetryAfter), true
	}
	return 0, false
}

// attempt serves op once within ctx; attempt counts from 1.
func (rn *runner) attempt(ctx context.Context, clk *opClock, op *operation, attempt int) result {
	parent := clk.parent
	w := clk.spare
	if w != nil {
		clk.spare = nil
		clear(w.header)
		*w = opWriter{header: w.header, body: w.body[:0]}
	} else {
		w = &opWriter{header: make(http.Header)}
	}
	w.limit = rn.h.MaxResponseSize
	req := rn.newRequest(ctx, op, w, attempt)
	err := serve(rn.next, w, req)

	if c := rn.h.logger.Check(zapcore.DebugLevel, "batch operation"); c != nil {
		c.Write(zap.String("batch", rn.id), zap.String("op", op.id), zap.String("method", op.method),
			zap.String("path", op.target), zap.Int("status", w.status), zap.Error(err))
	}

	switch {
	case w.overflow:
		return result{status: http.StatusBadGateway, err: fmt.Sprintf("response larger than max_response_size (%d bytes)", rn.h.MaxResponseSize)}
	case parent.Err() != nil:
		return rn.cutOff(parent)
	case ctx.Err() != nil:
		return result{status: http.StatusGatewayTimeout, err: "operation timed out after " + time.Duration(rn.h.OpTimeout).String()}
	}
	if err != nil {
		return rn.failed(op, w, err)
	}
	status := w.status
	if status == 0 {
		status = http.StatusOK
	}
	return result{status: status, header: w.header, body: w.body, w: w, isJSON: jsonBody(w.header, w.body)}
}

// failed is the result of an operation whose handler returned err.
func (rn *runner) failed(op *operation, w *opWriter, err error) result {
	var p panicError
	switch {
	case errors.Is(err, errNestedBatch):
		return result{status: http.StatusBadRequest, err: errNestedBatchMsg}
	case errors.As(err, &p):
		rn.h.logger.Error("panic in handler serving batch operation",
			zap.String("batch", rn.id), zap.String("op", op.id), zap.Any("panic", p.value), zap.String("stack", p.stack))
		return result{status: http.StatusInternalServerError, err: "handler panicked"}
	case errors.Is(err, http.ErrAbortHandler):
		return result{status: http.StatusBadGateway, err: "response was cut off"}
	}
	// Handlers often return an error instead of writing one; it decides
	// the status, and what they wrote before (WWW-Authenticate, say) stays.
	status := http.StatusInternalServerError
	var he caddyhttp.HandlerError
	if errors.As(err, &he) && he.StatusCode != 0 {
		status = he.StatusCode
	}
	return result{status: status, header: w.header}
}

// newRequest builds the sub-request of op: a fresh request with its own
// replacer, vars and route-group state, carrying the outer request's
// connection facts and inherited headers under its own.
func (rn *runner) newRequest(ctx context.Context, op *operation, w http.ResponseWriter, attempt int) *http.Request {
	c := &rn.conn
	// The first attempt takes the URL parsed for the operation alone.
	// Handlers such as rewrite change r.URL in place: a retry parses the
	// target again, which was validated and cannot fail.
	u := op.url
	if attempt > 1 {
		u = new(url.URL)
		_ = parseTargetInto(op.target, u)
	}
	// Built on the stack and copied once by WithContext: one Request on
	// the heap. The header map is the request's own.
	base := http.Request{
		Method:     op.method,
		URL:        u,
		Proto:      c.proto,
		ProtoMajor: c.protoMajor,
		ProtoMinor: c.protoMinor,
		Header:     make(http.Header, len(rn.inherited)+len(op.header)),
		Body:       http.NoBody,
		Host:       c.host,
		RemoteAddr: c.remoteAddr, // before PrepareRequest: it derives the client IP from it
		RequestURI: op.target,
		TLS:        c.tls,
	}
	req := base.WithContext(ctx)
	for k, v := range rn.inherited {
		req.Header[k] = v[:len(v):len(v)] // appends copy: parallel ops share these slices
	}
	for k, v := range op.header {
		req.Header[k] = v[:len(v):len(v)]
	}
	if op.body != nil {
		body := op.body
		req.ContentLength = int64(len(body))
		req.Body = io.NopCloser(bytes.NewReader(body))
		req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	}

	repl := caddy.NewReplacer()
	repl.Map(func(key string) (any, bool) {
		switch key {
		case "http.batch.id":
			return rn.id, true
		case "http.batch.index":
			return strconv.Itoa(op.index), true
		case "http.batch.op_id":
			return op.id, true
		}
		return nil, false
	})
	return caddyhttp.PrepareRequest(req, repl, w, rn.srv)
}

// Outer headers an operation never inherits: they describe the outer
// message or connection, or ask something of the batch as a whole.
var notInherited = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Te": true, "Trailer": true,
	"Transfer-Encoding": true, "Upgrade": true, "Accept-Encoding": true,
	"Expect": true, "Prefer": true, "Idempotency-Key": true,
}

func notInheritable(name string) bool {
	return notInherited[name] ||
		len(name) > 6 && (name[:6] == "Proxy-") ||
		len(name) > 8 && name[:8] == "Content-"
}

// inheritedHeaders returns the outer headers each operation starts from.
func (h *Handler) inheritedHeaders(outer http.Header) http.Header {
	hdr := make(http.Header, len(outer))
	if h.inherit != nil {
		for _, name := range h.inherit {
			if v, ok := outer[name]; ok && !notInheritable(name) {
				hdr[name] = v
			}
		}
		return hdr
	}
	for name, v := range outer {
		if !notInheritable(name) {
			hdr[name] = v
		}
	}
	// Headers the Connection header names are hop-by-hop too.
	for _, v := range outer["Connection"] {
		for _, name := range splitComma(v) {
			delete(hdr, http.CanonicalHeaderKey(name))
		}
	}
	return hdr
}

// serve runs next, turning a panic into an error so that it fails one
// operation, not the batch or the server.
func serve(next caddyhttp.Handler, w http.ResponseWriter, r *http.Request) (err error) {
	defer func() {
		if v := recover(); v != nil {
			if v == http.ErrAbortHandler { //nolint:errorlint // sentinel compared as Go's server does
				err = http.ErrAbortHandler
				return
			}
			err = panicError{value: v, stack: stack()}
		}
	}()
	return next.ServeHTTP(w, r)
}

type panicError struct {
	value any
	stack string
}

func (p panicError) Error() string { return fmt.Sprintf("panic: %v", p.value) }

// opWriter captures one operation's answer. It never touches the client's
// writer: sub-responses must not leak headers into the batch response.
type opWriter struct {
	header   http.Header
	status   int
	body     []byte
	size     int64 // of the headers
	limit    int64
	overflow bool
}

var errResponseTooLarge = errors.New("operation response larger than max_response_size")

func (w *opWriter) Header() http.Header { return w.header }

func (w *opWriter) WriteHeader(code int) {
	if w.status != 0 || code < 200 { // informational answers are not the result
		return
	}
	w.status = code
	// The headers count against max_response_size too.
	n := int64(0)
	for k, vs := range w.header {
		for _, v := range vs {
			n += int64(len(k) + len(v) + 4)
		}
	}
	w.size = n
	if n > w.limit {
		w.overflow = true
	}
}

func (w *opWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.overflow || w.size+int64(len(w.body)+len(p)) > w.limit {
		w.overflow = true
		return 0, errResponseTooLarge
	}
	w.body = append(w.body, p...)
	return len(p), nil
}

// Flush is a no-op: the answer is complete only when the handler returns.
func (w *opWriter) Flush() {}
