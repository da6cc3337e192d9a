package batch

import (
	"context"
	"errors"
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
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the operation did not end at its op_timeout")
	}
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
