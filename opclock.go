package batch

import (
	"context"
	"errors"
	"sync"
	"time"
)

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
