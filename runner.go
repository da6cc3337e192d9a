package batch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
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
	// job is the job the runner runs, nil for a batch.
	job jobControl
	// budget counts failures against the failure budget; nil for none.
	budget *failureBudget
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
	// logs are the access loggers operations are logged to; nil for none.
	logs []*zap.Logger
	// refs is what filling in references may still cost.
	refs refBudget
	// opKey is the header that carries each operation's idempotency key,
	// "<batch id>.<op id>", unless the operation has its own; "" for none.
	opKey string
	// caller is the hash of a job's owner: its operations are paced as
	// its own.
	caller string
	// pace is who the operations wait as for a turn downstream; a job's
	// is made at its first operation.
	pace     *pace.Owner
	paceOnce sync.Once
}

// newRunner returns the runner of b, a batch sent in r, bounded by ctx,
// whose operations go on to next.
func newRunner(h *Handler, ctx context.Context, r *http.Request, next caddyhttp.Handler, b *batch) (*runner, error) {
	rn := &runner{h: h, id: newBatchID(), next: next, base: ctx, timeout: time.Duration(h.Timeout)}
	rn.load(b)
	rn.refs.reset(h.MaxReferenceSize)
	rn.pace = batchPaceOwner(r, h.Pacing == pacingAdaptive, h.Rate, h.owners)
	var err error
	if rn.srv, err = serverOf(r); err != nil {
		return nil, err
	}
	rn.conn = connFactsOf(r)
	rn.inherited = inheritedHeaders(r.Header, h.inherit)
	rn.logs = rn.accessLoggers()
	// The batch request's own log entry may name the batch (log_append).
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		repl.Set("http.batch.id", rn.id)
	}
	return rn, nil
}

// load makes b the operations the runner runs next: a whole batch, or a
// part of a job's operations.
func (rn *runner) load(b *batch) {
	rn.b = b
	rn.ctx = context.WithValue(rn.base, batchCtxKey, b)
	rn.results = make([]result, len(b.ops))
	rn.stoppedAt = -1
	rn.budget = newFailureBudget(rn.h, b)
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
	rn.logEnd(sum, time.Since(start))
	return sum
}

// logEnd writes the line of a batch, or a job, that has ended.
func (rn *runner) logEnd(sum summary, took time.Duration) {
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
	return rn.job != nil && rn.job.handingOver() && (rn.out == nil || !rn.out.hold)
}

// handedOver reports whether a shutdown cut off a job another instance
// resumes, or another instance took it over: what its operations were cut
// off from is theirs to finish, and nothing is rolled back.
func (rn *runner) handedOver() bool {
	cause := context.Cause(rn.ctx)
	return rn.job != nil && (rn.job.resumable() && errors.Is(cause, errInterrupted) || errors.Is(cause, errLeaseLost))
}

// runOne decides what becomes of one operation, and under atomicity
// whether the batch stops there: whatever failed it, a timeout, the client
// going away or a cancel included, the operations after it do not run and
// those before it are rolled back.
func (rn *runner) runOne(op *operation, clk *opClock) result {
	res := rn.decide(op, clk)
	rn.budget.count(op, &res)
	// An operation its condition skipped is no failure: it did what the
	// batch asked. Nor, to the batch, is one that a condition tests: it
	// expects that it may fail (the lookup of an upsert answering 404).
	// An atomicity group fails at any failure of its own, as OData has it.
	failed := res.failed() && !res.unmet()
	if rn.b.atomicity != atomicNone && rn.stoppedAt < 0 && failed && !op.tested {
		rn.stoppedAt, rn.stoppedBy = op.index, op.id
	}
	if op.group != 0 && failed && rn.groupFailed[op.group-1] < 0 {
		// The group's operations run in order (each depends on the one
		// before), so those before op are final.
		rn.results[op.index] = res
		rn.failGroup(op)
	}
	return res
}

// decide runs op, or answers for it.
func (rn *runner) decide(op *operation, clk *opClock) result {
	if ended(rn.ctx) {
		return rn.cutOff(rn.ctx)
	}
	if rn.job != nil {
		if why := rn.job.halted(); why != "" {
			return result{status: statusSkipped, err: why}
		}
	}
	if rn.stoppedBy != "" {
		return result{status: statusSkipped, err: "skipped: batch stopped at op " + rn.stoppedBy}
	}
	if rn.budget.exhausted() {
		return result{status: statusSkipped, err: errBudgetExhausted}
	}
	if g := op.group - 1; g >= 0 && rn.groupFailed[g] >= 0 {
		return result{status: statusSkipped, err: fmt.Sprintf("skipped: atomicity group %s failed at op %s", rn.b.groups[g].name, rn.b.ops[rn.groupFailed[g]].id)}
	}
	if op.cond != nil && !op.cond.eval(rn.finalStatus) {
		return result{status: http.StatusPreconditionFailed, err: errConditionFalse}
	}
	for _, d := range op.deps {
		dep := &rn.results[d]
		if rn.tests(op, d) || dep.unmet() && op.group != 0 && rn.b.ops[d].group == op.group {
			// The condition judged it; or it is the one before op in
			// their atomicity group, whose order alone op waited for.
			continue
		}
		if dep.failed() {
			return result{status: statusSkipped, err: fmt.Sprintf("dependency %s failed with status %d", rn.b.ops[d].id, dep.status)}
		}
		if g := rn.b.ops[d].group - 1; g >= 0 && g != op.group-1 && rn.groupFailed[g] >= 0 {
			return result{status: statusSkipped, err: fmt.Sprintf("dependency %s failed: atomicity group %s failed at op %s",
				rn.b.ops[d].id, rn.b.groups[g].name, rn.b.ops[rn.groupFailed[g]].id)}
		}
	}
	return rn.resolveAndExec(op, clk)
}

// errConditionFalse is the error of an operation its "if" skipped (412).
const errConditionFalse = "condition false"

// finalStatus is the status of operation i for a condition: what it
// answered, 424 when it was not run, or when its atomicity group undid
// it, as OData counts it.
func (rn *runner) finalStatus(i int) int {
	res := &rn.results[i]
	if res.undone != nil && *res.undone {
		return statusSkipped
	}
	return res.status
}

// tests reports whether op's condition names dependency d, or an
// operation of d's atomicity group: the condition decides what d's
// failure does to op, not the dependency.
func (rn *runner) tests(op *operation, d int) bool {
	if op.cond == nil {
		return false
	}
	g := rn.b.ops[d].group
	for _, j := range op.cond.ops {
		if j == d || g != 0 && g != op.group && rn.b.ops[j].group == g {
			return true
		}
	}
	return false
}

// errInterrupted is the cause with which a shutdown cancels async jobs.
var errInterrupted = errors.New("interrupted")

// ended reports whether ctx has ended, or its deadline has passed: a
// context reports that only once its timer fires, and an operation of a
// job whose time is up must not go out meanwhile.
func ended(ctx context.Context) bool {
	if ctx.Err() != nil {
		return true
	}
	d, ok := ctx.Deadline()
	return ok && !time.Now().Before(d)
}

// cutOff is the result of an operation that the end of ctx (the batch's,
// or its rollbacks') kept from finishing.
func (rn *runner) cutOff(ctx context.Context) result {
	cause := context.Cause(ctx)
	if cause == nil {
		cause = context.DeadlineExceeded // passed; its timer has not fired yet
		if rn.job != nil {
			cause = errWindowPassed // the one deadline of a job
		}
	}
	switch {
	case errors.Is(cause, errWindowPassed):
		return result{status: statusSkipped, err: errWindowSkip}
	case errors.Is(cause, errRollbackTimeout):
		return result{status: http.StatusGatewayTimeout, err: "rollbacks timed out after " + time.Duration(rn.h.Timeout).String(), cut: true}
	case errors.Is(cause, errInterrupted):
		return result{status: http.StatusServiceUnavailable, err: "interrupted: the server shut down", cut: true}
	case errors.Is(cause, errLeaseLost):
		return result{status: http.StatusServiceUnavailable, err: "taken over by another instance", cut: true}
	case errors.Is(cause, context.DeadlineExceeded):
		return result{status: http.StatusGatewayTimeout, err: "batch timed out after " + rn.timeout.String(), cut: true}
	}
	return result{status: statusClientGone, err: "client went away", cut: true}
}

// cutInFlight is the result of an operation that the end of ctx cut off
// while it was downstream.
func (rn *runner) cutInFlight(ctx context.Context) result {
	if errors.Is(context.Cause(ctx), errWindowPassed) {
		return result{status: http.StatusGatewayTimeout, err: errWindowCut, cut: true}
	}
	return rn.cutOff(ctx)
}

// resolveAndExec fills in op's references and runs it.
func (rn *runner) resolveAndExec(op *operation, clk *opClock) result {
	if op.refs != nil {
		var err error
		if op, err = rn.resolve(op); err != nil {
			return result{status: statusSkipped, err: err.Error()}
		}
	}
	if strings.EqualFold(op.url.Path, rn.conn.path) {
		// The chain after batch would not bring it back here, but a client
		// who sends it means a batch inside a batch.
		return result{status: http.StatusBadRequest, err: errNestedBatchMsg}
	}
	return rn.exec(op, clk)
}

// exec serves one operation through the rest of the handler chain, each
// try after a turn from the handler's gate (max_inflight, rate, pacing),
// and tries it again as retryWait says: within op_timeout for a batch's;
// for a job's, after no Retry-After longer than op_timeout.
func (rn *runner) exec(op *operation, clk *opClock) result {
	o, g := rn.paceOwner(), rn.h.gate
	// op_timeout bounds a batch's operation from its first wait for a
	// turn on; a job's, each try in flight: its place in the job's queue
	// is bounded by the job, and it is never answered 504 unsent.
	perTry := rn.job != nil
	var ctx context.Context
	var deadline time.Time
	if !perTry {
		ctx, deadline = clk.arm()
		defer clk.disarm()
	}
	for attempt := 1; ; attempt++ {
		var res result
		asked := time.Now()
		waitCtx := ctx
		if perTry {
			waitCtx = clk.parent
		}
		t, err := g.Acquire(waitCtx, o)
		rn.h.metrics.turnWait.Observe(time.Since(asked).Seconds())
		if err != nil {
			res = rn.waitedOut(clk.parent)
		} else {
			if perTry {
				ctx, deadline = clk.arm()
			}
			res = rn.attempt(ctx, clk, op, attempt)
			if perTry {
				clk.disarm()
			}
			if r := g.Release(t, res.status, res.header); r.Event != "" {
				rn.h.metrics.pacing.WithLabelValues(r.Event).Inc()
				rn.h.logger.Debug("pacing", zap.String("event", r.Event), zap.Float64("rate", r.Rate),
					zap.Duration("paused_for", r.Paused), zap.String("batch", rn.id), zap.String("op", op.id))
			}
		}
		res.attempts = attempt
		wait, retry := rn.retryWait(op, o, &res, attempt)
		switch {
		case !retry:
			return res
		case !perTry && time.Until(deadline) < wait:
			return res // op_timeout cannot hold the wait: the last answer stands
		case perTry && wait > time.Duration(rn.h.OpTimeout) && !(o.Adaptive && res.status == http.StatusTooManyRequests):
			return res // nor, in a job, a Retry-After past op_timeout; the pacer's pauses are the job's to wait
		}
		rn.h.metrics.retries.WithLabelValues(strconv.Itoa(res.status)).Inc()
		select {
		case <-time.After(wait):
		case <-waitCtx.Done():
			return res
		}
	}
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

// record counts the batch in the metrics.
func (rn *runner) record(sum summary, took time.Duration) {
	rn.recordOps(0)
	rn.recordBatch(sum, took)
}

// recordBatch counts a batch, or a job, once it has ended.
func (rn *runner) recordBatch(sum summary, took time.Duration) {
	m := rn.h.metrics
	m.batches.WithLabelValues(rn.b.mode, sum.status).Inc()
	m.size.Observe(float64(sum.total))
	m.duration.WithLabelValues(rn.b.mode).Observe(took.Seconds())
}

// recordOps counts the operations rn ran, from index from on.
func (rn *runner) recordOps(from int) {
	var classes [6]int
	for i := from; i < len(rn.results); i++ {
		if s := rn.results[i].status; s != 0 { // 0: not run, handed over
			classes[min(s/100, 5)]++
		}
	}
	rn.countOps(classes)
}

// countOps counts operations by status class in the metrics.
func (rn *runner) countOps(classes [6]int) {
	for c, n := range classes {
		if n > 0 {
			rn.h.metrics.operations.WithLabelValues(statusClass(c * 100)).Add(float64(n))
		}
	}
}

// paceOwner returns who the runner's operations wait as. A batch's is set
// as it starts; a job's is made at its first operation, adaptive.
func (rn *runner) paceOwner() *pace.Owner {
	rn.paceOnce.Do(func() {
		if rn.pace == nil {
			rn.pace = &pace.Owner{Adaptive: true, Key: rn.jobRateKey(), PaceKey: paceKey(rn.caller, rn.conn.host)}
		}
	})
	return rn.pace
}

// batchPaceOwner is who the operations of a batch sent in r wait as.
func batchPaceOwner(r *http.Request, adaptive bool, rate *RateConfig, owners *owners) *pace.Owner {
	o := &pace.Owner{Adaptive: adaptive}
	if adaptive {
		who, _ := owners.of(r) // anonymous batches share a pacer
		o.PaceKey = paceKey(who.hash, r.Host)
	}
	if rate != nil && rate.Key != "" {
		if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
			o.Key = repl.ReplaceAll(rate.Key, "")
		}
	}
	return o
}

// paceKey names the pacer of a caller's operations to a host: an API's
// limits are usually per caller, and one caller's 429s must slow only
// that caller.
// The host is taken without its port: the instances of a cluster are
// reached at one name, on ports that may differ.
func paceKey(owner, host string) string {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	return owner + "\x00" + strings.ToLower(host)
}

// jobRateKey resolves the rate key for a job, which has no request: a
// stand-in with the connection facts and inherited headers it keeps.
func (rn *runner) jobRateKey() string {
	h := rn.h
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

// setLogFields puts the batch's id and counts on the batch request's own
// access log entry.
func setLogFields(r *http.Request, id string, sum summary) {
	extra, ok := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields)
	if !ok {
		return
	}
	extra.Set(zap.Dict("batch", zap.String("id", id), zap.Int("operations", sum.total),
		zap.Int("succeeded", sum.succeeded), zap.Int("failed", sum.failed), zap.Int("skipped", sum.skipped)))
}
