package batch

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"time"

	"github.com/caddy-batch/batch/internal/pace"
	"github.com/caddyserver/caddy/v2"
)

// RetryConfig says which answers an operation is sent again after, how
// often and after what wait. An operation's tries all fit in its
// op_timeout: a wait that would pass it is not waited, and the last
// answer stands.
type RetryConfig struct {
	// Statuses of the answers that are tried again, 400 to 599. An
	// upstream that reverse_proxy cannot reach answers 502. Answers the
	// batch layer gives (a timeout, an answer over max_response_size) are
	// never tried again. Default: 429 503.
	Statuses []int `json:"statuses,omitempty"`

	// Tries in all, the first one included, 1 to 100; 1 tries nothing
	// again. A batch may set its own with the batch field "max_attempts"
	// (1 to 10). Default: 1 for sync batches, 5 for async jobs.
	MaxAttempts int `json:"max_attempts,omitempty"`

	// The wait before the first retry and the longest wait, in that
	// order: retry n waits a random time up to first × 2^(n-1), at most
	// the cap (full jitter), unless the answer's Retry-After says how
	// long. Default: ["200ms", "30s"].
	Backoff []caddy.Duration `json:"backoff,omitempty"`

	// Which operations are sent again: "idempotent" (GET, HEAD, PUT,
	// DELETE, OPTIONS, and any operation that carries an idempotency key:
	// an Idempotency-Key header of its own, or the one every operation of
	// an async job is sent with) or "all". Default: idempotent.
	Methods string `json:"methods,omitempty"`
}

// Defaults and bounds of retries.
const (
	defaultRetryFirst    = 200 * time.Millisecond
	defaultRetryCap      = 30 * time.Second
	defaultJobAttempts   = 5
	maxConfigAttempts    = 100
	maxBatchAttempts     = 10 // the batch field's
	unreadableRetryAfter = time.Second
)

// Values of the retry block's methods.
const (
	retryMethodsIdem = "idempotent"
	retryMethodsAll  = "all"
)

var defaultRetryStatuses = []int{http.StatusTooManyRequests, http.StatusServiceUnavailable}

// retryPolicy is a RetryConfig with its defaults filled in.
type retryPolicy struct {
	statuses   []int
	sync, job  int // tries in all, unless the batch says
	first, cap time.Duration
	all        bool // every method, not only idempotent ones
}

// retryPolicy returns the handler's policy: the retry block's, or
// retry_429's (an alias: 429 only, retry_429 + 1 tries).
func (h *Handler) retryPolicy() retryPolicy {
	rc := h.Retry
	if rc == nil {
		rc = &RetryConfig{}
		if h.Retry429 > 0 {
			rc.Statuses, rc.MaxAttempts = []int{http.StatusTooManyRequests}, h.Retry429+1
		}
	}
	p := retryPolicy{statuses: rc.Statuses, sync: rc.MaxAttempts, job: rc.MaxAttempts,
		first: defaultRetryFirst, cap: defaultRetryCap, all: rc.Methods == retryMethodsAll}
	if len(p.statuses) == 0 {
		p.statuses = defaultRetryStatuses
	}
	if rc.MaxAttempts == 0 {
		p.sync, p.job = 1, defaultJobAttempts
	}
	if len(rc.Backoff) == 2 {
		p.first, p.cap = time.Duration(rc.Backoff[0]), time.Duration(rc.Backoff[1])
	}
	return p
}

// validate checks the retry block, and that retry_429 is not given with it.
func (rc *RetryConfig) validate(retry429 int) error {
	switch {
	case retry429 != 0:
		return errors.New("retry_429 is an alias of the retry block: give one of them")
	case rc.MaxAttempts < 0 || rc.MaxAttempts > maxConfigAttempts:
		return fmt.Errorf("retry: max_attempts must be 1 to %d, got %d", maxConfigAttempts, rc.MaxAttempts)
	case rc.Methods != "" && rc.Methods != retryMethodsIdem && rc.Methods != retryMethodsAll:
		return fmt.Errorf("retry: methods must be %q or %q, got %q", retryMethodsIdem, retryMethodsAll, rc.Methods)
	case len(rc.Backoff) != 0 && len(rc.Backoff) != 2:
		return fmt.Errorf("retry: backoff takes two durations, first and cap, got %d", len(rc.Backoff))
	case len(rc.Backoff) == 2 && (rc.Backoff[0] <= 0 || rc.Backoff[1] < rc.Backoff[0]):
		return fmt.Errorf("retry: backoff must be positive, its cap at least its first wait, got %s %s",
			time.Duration(rc.Backoff[0]), time.Duration(rc.Backoff[1]))
	}
	for _, s := range rc.Statuses {
		if s < 400 || s > 599 {
			return fmt.Errorf("retry: statuses must be 400 to 599, got %d", s)
		}
	}
	return nil
}

// wait is how long retry n (from 1) of an answer with header h waits:
// its Retry-After, or a random time up to first × 2^(n-1) within the cap.
// A Retry-After that cannot be read waits a second at least.
func (p *retryPolicy) wait(h http.Header, n int) time.Duration {
	if d, ok := pace.RetryAfter(h); ok {
		return d
	}
	ceiling := p.cap
	if n-1 < 40 && p.first<<(n-1) < p.cap && p.first<<(n-1) > 0 {
		ceiling = p.first << (n - 1)
	}
	d := time.Duration(rand.Uint64N(uint64(ceiling) + 1)) // a cap of MaxInt64 ns overflowed ceiling+1
	if h.Get("Retry-After") != "" {
		d = max(d, unreadableRetryAfter)
	}
	return d
}

// retryWait says whether the answer res to try attempt of op is tried
// again, and after how long. Under adaptive pacing a 429 is a refusal,
// not processed: any method is sent again when the pacer says. Otherwise
// the retry policy decides.
func (rn *runner) retryWait(op *operation, o *pace.Owner, res *result, attempt int) (time.Duration, bool) {
	if res.err != "" {
		return 0, false // the batch layer's answer, not the API's
	}
	if o.Adaptive && res.status == http.StatusTooManyRequests {
		if attempt >= pace.MaxAdaptiveAttempts {
			return 0, false
		}
		return rn.h.gate.RetryWait(o, attempt), true
	}
	p := &rn.h.retry
	if attempt >= rn.maxAttempts() || !slices.Contains(p.statuses, res.status) ||
		!p.all && !idempotent(op.method) && !rn.keyed(op) {
		return 0, false
	}
	return p.wait(res.header, attempt), true
}

// maxAttempts is how many tries an operation of the batch rn runs gets.
func (rn *runner) maxAttempts() int {
	switch {
	case rn.b.maxAttempts > 0:
		return rn.b.maxAttempts
	case rn.job != nil:
		return rn.h.retry.job
	}
	return rn.h.retry.sync
}

// keyed reports whether op is sent with an idempotency key, so that the
// API can tell a try sent again from a new request.
func (rn *runner) keyed(op *operation) bool {
	return rn.opKey != "" || len(op.header["Idempotency-Key"]) > 0
}
