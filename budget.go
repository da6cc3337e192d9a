package batch

import (
	"sync/atomic"

	"github.com/tidwall/gjson"
)

// A failure budget stops a batch or a job whose operations keep failing (a
// mapping bug in an import fails every record): once its failed operations
// reach max_failures, or their share of the operations run reaches
// max_failure_rate over at least the sample, no further operation starts,
// and the rest are skipped. Reaching the budget stops: with max_failures
// 50, the 50th failure is the last operation to fail, but for those
// already in flight, which finish.

// errBudgetExhausted is the error of an operation the failure budget
// skipped (424).
const errBudgetExhausted = "failure budget exhausted"

// stopFailureBudget is the stop_reason of a job the budget stopped.
const stopFailureBudget = "failure_budget"

const (
	// defaultFailureSample is how many operations run before the failure
	// rate counts: one failure out of the first three is no trend.
	defaultFailureSample = 100
	// maxBudgetFailures bounds max_failures as a batch field.
	maxBudgetFailures = 1_000_000_000
)

// failureBudget counts the failures of a batch or job against its budget;
// nil when it has none. Workers count into it at once.
type failureBudget struct {
	max    int64   // failures that exhaust it; 0 for no such bound
	rate   float64 // share of failures that exhausts it; 0 for none
	sample int64   // operations run before the rate counts

	failed, ran atomic.Int64
	spent       atomic.Bool
}

// newFailureBudget returns the budget of batch b under h's config: the
// batch's fields win over the handler's; nil when neither sets one.
func newFailureBudget(h *Handler, b *batch) *failureBudget {
	fb := &failureBudget{max: int64(h.MaxFailures), rate: h.MaxFailureRate, sample: int64(h.FailureRateSample)}
	if b.maxFailures > 0 {
		fb.max = int64(b.maxFailures)
	}
	if b.maxFailureRate > 0 {
		fb.rate = b.maxFailureRate
	}
	if fb.max == 0 && fb.rate == 0 {
		return nil
	}
	if fb.sample <= 0 {
		fb.sample = defaultFailureSample
	}
	return fb
}

// exhausted reports whether no further operation may start. It reads the
// counts, not only the flag: a failure counted by one worker stops the
// next operation of every other at once.
func (fb *failureBudget) exhausted() bool {
	return fb != nil && (fb.spent.Load() || fb.reached(fb.failed.Load(), fb.ran.Load()))
}

// reached reports whether f failures out of n operations run spend the
// budget.
func (fb *failureBudget) reached(f, n int64) bool {
	return fb.max > 0 && f >= fb.max || fb.rate > 0 && n >= fb.sample && float64(f) >= fb.rate*float64(n)-1e-9
}

// count counts the result of op, which has run. What was skipped counts
// for nothing; nor does the failure of an operation that a condition
// tests (the lookup of an upsert answering 404 is expected), nor an
// operation cut off by the batch's end.
func (fb *failureBudget) count(op *operation, res *result) {
	if fb == nil || res.cut {
		return
	}
	switch outcomeOf(res) {
	case outcomeSkipped:
		return
	case outcomeFailed:
		if op.tested {
			return
		}
		fb.add(1, 1)
	default:
		fb.add(0, 1)
	}
}

// seed takes up the counts a job had when it was stored: a resumed job, or
// one run on after a hand-over, spends the budget where it was.
func (fb *failureBudget) seed(failed, ran int) {
	if fb != nil {
		fb.add(int64(failed), int64(ran))
	}
}

func (fb *failureBudget) add(failed, ran int64) {
	// Runs are counted before failures, and read after them (exhausted),
	// so that a reader never sees a failure without its run. Once spent,
	// the budget stays spent: later successes lower the rate, but what was
	// skipped was skipped.
	fb.ran.Add(ran)
	fb.failed.Add(failed)
	if fb.reached(fb.failed.Load(), fb.ran.Load()) {
		fb.spent.Store(true)
	}
}

// budgetField reads the batch fields max_failures and max_failure_rate.
func (p *parser) budgetField(b *batch, key string, v gjson.Result) {
	switch key {
	case "max_failures":
		if n := p.wholeField(key, v, maxBudgetFailures); n > 0 {
			b.maxFailures = n
		}
	case "max_failure_rate":
		if v.Type != gjson.Number || !(v.Num > 0 && v.Num <= 1) {
			p.batchFault("max_failure_rate must be a fraction above 0 and at most 1 (0.05 for 5%%), got %s", short(v.Raw))
			return
		}
		b.maxFailureRate = v.Num
	}
}
