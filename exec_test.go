package batch

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// One clock serves a goroutine's operations in turn: each operation's
// context ends at its own op_timeout (the timer set for an earlier one
// re-arms itself), when the operation ends, or with the batch.
func TestOpClock(t *testing.T) {
	const d = 400 * time.Millisecond
	batchCtx, endBatch := context.WithCancelCause(context.WithValue(context.Background(), batchCtxKey, "marker"))
	defer endBatch(nil)
	rn := &runner{h: &Handler{OpTimeout: caddy.Duration(d)}}
	clk := rn.newClock(batchCtx)
	defer clk.stop()

	// A quick operation: its context ends with it, and keeps the batch's values.
	ctx, _ := clk.arm()
	if ctx.Value(batchCtxKey) != "marker" {
		t.Error("an operation's context must carry the batch's values")
	}
	clk.disarm()
	if ctx.Err() == nil {
		t.Fatal("an operation's context must end when it does")
	}
	if context.Cause(ctx) == errOpTimeout {
		t.Error("a finished operation did not time out")
	}

	// The next one starts later: the timer armed for the first must not
	// cut it off at the first one's deadline.
	time.Sleep(d / 2)
	start := time.Now()
	ctx, deadline := clk.arm()
	if got := deadline.Sub(start); got < d || got > d+d/4 {
		t.Errorf("deadline %v after arming, want op_timeout %v", got, d)
	}
	time.Sleep(d*3/4 - (time.Since(start)))
	if ctx.Err() != nil {
		t.Fatalf("operation ended %v after it started, before its op_timeout %v", time.Since(start), d)
	}
	<-ctx.Done()
	if took := time.Since(start); took < d {
		t.Errorf("operation ended after %v, before op_timeout %v", took, d)
	}
	if cause := context.Cause(ctx); cause != errOpTimeout {
		t.Errorf("cause %v, want %v", cause, errOpTimeout)
	}
	clk.disarm()

	// The batch's end ends the running operation, with the batch's cause.
	ctx, _ = clk.arm()
	gone := errors.New("client went away")
	endBatch(gone)
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the batch's end did not end the running operation")
	}
	if cause := context.Cause(ctx); cause != gone {
		t.Errorf("cause %v, want the batch's %v", cause, gone)
	}
	clk.disarm()

	// An operation armed after the batch ended starts ended.
	ctx, _ = clk.arm()
	if context.Cause(ctx) != gone {
		t.Errorf("operation armed after the batch ended: cause %v", context.Cause(ctx))
	}
	clk.disarm()
}

// Retry-After values past what a Duration holds, or unreadable, neither
// make retries immediate nor wrap around: a wait is capped, and an
// unreadable one is the documented second.
func TestRetryAfterOutOfRange(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		retry_429 2
		op_timeout 900ms
	}`))
	_, _, body := post(t, base+"/batch", `{"batch":[
		{"path":"/limited?id=big&n=9&after=9223372037"},
		{"path":"/limited?id=wrap&n=9&after=18446744074"},
		{"path":"/limited?id=soon&n=9&after=soon"}]}`)
	res := mustJSON(t, body)
	be.mu.Lock()
	calls := map[string]int{"big": be.limited["big"], "wrap": be.limited["wrap"], "soon": be.limited["soon"]}
	be.mu.Unlock()
	for id, n := range calls {
		// Each wait is longer than op_timeout leaves: no retry.
		if n != 1 {
			t.Errorf("%s: sent %d times, want once: %s", id, n, body)
		}
	}
	if got := res.Get("retry_after").Int(); got != int64(maxRetryAfter/time.Second) {
		t.Errorf("envelope retry_after = %d, want the cap %d", got, int64(maxRetryAfter/time.Second))
	}
}

func TestRetryAfterParse(t *testing.T) {
	future := time.Now().Add(90 * time.Second).UTC().Format(http.TimeFormat)
	cases := []struct {
		value string
		wait  time.Duration // 0 with ok false: none or unreadable
		ok    bool
	}{
		{"", 0, false},
		{"0", 0, true},
		{" 7 ", 7 * time.Second, true},
		{"86400", maxRetryAfter, true},
		{"86401", maxRetryAfter, true},
		{"9223372037", maxRetryAfter, true},
		{"18446744074", maxRetryAfter, true},
		{"99999999999999999999999", maxRetryAfter, true},
		{"-5", 0, false},
		{"1.5", 0, false},
		{"soon", 0, false},
		{"Wed, 21 Oct 2015 07:28:00 GMT", 0, true}, // past
		{"Fri, 31 Dec 9999 23:59:59 GMT", maxRetryAfter, true},
	}
	for _, c := range cases {
		wait, ok := retryAfter(http.Header{"Retry-After": {c.value}})
		if wait != c.wait || ok != c.ok {
			t.Errorf("Retry-After %q: %v %v, want %v %v", c.value, wait, ok, c.wait, c.ok)
		}
	}
	if wait, ok := retryAfter(http.Header{"Retry-After": {future}}); !ok || wait < 80*time.Second || wait > 90*time.Second {
		t.Errorf("an HTTP-date 90s ahead: %v %v", wait, ok)
	}
}

// Under atomicity any end of the batch after a success stops it there and
// rolls back what ran: also a timeout, the client going away or a cancel
// between two operations, not only a failed operation.
func TestAtomicityStopsAtEveryEnd(t *testing.T) {
	h := &Handler{Atomicity: atomicAllOrNothing}
	if err := h.Provision(caddy.Context{Context: context.Background()}); err != nil {
		t.Fatal(err)
	}
	b, err := parseBatch(context.Background(), []byte(`[{"path":"/a"},{"path":"/b"}]`), &h.limits)
	if err != nil {
		t.Fatal(err)
	}
	for name, end := range map[string]func(rn *runner, cancel context.CancelFunc){
		"timeout or client gone": func(_ *runner, cancel context.CancelFunc) { cancel() },
		"canceled job":           func(rn *runner, _ context.CancelFunc) { rn.canceled.Store(true) },
	} {
		ctx, cancel := context.WithCancel(context.Background())
		rn := &runner{h: h, b: b, ctx: ctx, results: make([]result, 2), stoppedAt: -1}
		rn.results[0] = result{status: 200}
		end(rn, cancel)
		clk := rn.newClock(rn.ctx)
		res := rn.runOne(b.ops[1], clk)
		clk.stop()
		cancel()
		if !failed(&res) || rn.stoppedAt != 1 {
			t.Errorf("%s between operations: result %d %q, stopped at %d: the success before it would not be rolled back",
				name, res.status, res.err, rn.stoppedAt)
		}
	}
}

// A job canceled under all_or_nothing rolls back what it ran.
func TestAllOrNothingCanceledJobRollsBack(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	_, hdr, body := post(t, base+"/batch", `{"atomicity":"all_or_nothing","batch":[
		{"id":"mk","method":"POST","path":"/users","body":{"name":"Temp"},"rollback":{"method":"DELETE","path":"/users/{{mk.body.id}}"}},
		{"path":"/slow?d=600ms&id=s"},
		{"method":"POST","path":"/users","body":{"name":"Never"}}]}`, alice, "Prefer: respond-async")
	job := base + hdr.Get("Location")
	if hdr.Get("Location") == "" {
		t.Fatalf("submit: %s", body)
	}
	eventually(t, 10*time.Second, "the slow operation to start", func() bool { return slices.Contains(be.eventLog(), "start s") })
	if status, body := del(t, job, alice); status != 200 && status != 202 {
		t.Fatalf("cancel: %d %s", status, body)
	}
	waitJob(t, job, alice, "canceled")
	_, _, body = get(t, job+"/results", alice)
	res := mustJSON(t, body)
	if res.Get("results.0.undone").Bool() != true || res.Get("results.0.rollback.status").Int() != 204 ||
		res.Get("results.2.status").Int() != 424 || res.Get("status").String() != "rolled_back" {
		t.Errorf("results: %s", body)
	}
	if be.API.Len() != 0 {
		t.Errorf("the created user was not removed: %d users", be.API.Len())
	}
}

// Rollbacks have a budget of their own, the batch's timeout once more:
// they do not run on past it, whatever their number.
func TestRollbacksBounded(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		atomicity all_or_nothing
		timeout 1s
	}`))
	var ops []string
	for i := range 3 {
		ops = append(ops, fmt.Sprintf(`{"method":"POST","path":"/users","body":{"name":"U%d"},"rollback":{"path":"/slow?d=700ms&id=rb%d"}}`, i, i))
	}
	ops = append(ops, `{"method":"POST","path":"/users","body":{}}`) // 422
	_, _, body := post(t, base+"/batch", `{"batch":[`+strings.Join(ops, ",")+`]}`)
	res := mustJSON(t, body)
	if res.Get("status").String() != "rollback_failed" {
		t.Errorf("status: %s", body)
	}
	// Reverse order: rb2 runs (700 ms), rb1 is cut off at the budget, rb0
	// never starts.
	if r := res.Get("results.0.rollback"); r.Get("status").Int() != 504 || !strings.Contains(r.Get("error").String(), "rollbacks timed out after 1s") {
		t.Errorf("first operation's rollback: %s", r.Raw)
	}
	if slices.Contains(be.eventLog(), "start rb0") {
		t.Errorf("a rollback started past the budget: %v", be.eventLog())
	}
}
