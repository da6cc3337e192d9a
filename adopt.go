package batch

import (
	"context"
	"errors"
	"io/fs"
	"time"

	"go.uber.org/zap"
)

// adoptEvery is how often an instance looks for jobs to take over: a
// tenth of the lease, within bounds.
func (a *asyncJobs) adoptEvery() time.Duration {
	return min(max(a.leaseLength()/10, 50*time.Millisecond), 5*time.Second)
}

// adoptJobs takes over, while ctx lasts, the jobs whose lease has expired
// or was released, as long as this instance has a worker free for them.
func (a *asyncJobs) adoptJobs(ctx context.Context) {
	tick := time.NewTicker(a.adoptEvery())
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		a.adopt(ctx)
	}
}

func (a *asyncJobs) adopt(ctx context.Context) {
	p := a.pool
	if !p.hasRoom() {
		return
	}
	self, identity, ok := a.self()
	if !ok {
		return // not serving yet
	}
	for _, id := range a.store.jobIDs(ctx, activePrefix) {
		if ctx.Err() != nil || !p.hasRoom() {
			return
		}
		if p.holds(id) {
			continue
		}
		if err := a.adoptOne(ctx, id, self, identity); err != nil {
			a.logger.Warn("taking over an async batch", zap.String("id", id), zap.Error(err))
		}
	}
}

// adoptOne takes over job id if it is this handler's and free.
func (a *asyncJobs) adoptOne(ctx context.Context, id string, self endpoint, identity string) error {
	rec, err := a.store.loadJob(ctx, id)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// Swept, or never stored whole: nothing is left to run.
		if a.store.idleFor(ctx, activeKey(id), a.leaseLength()) {
			a.store.deactivate(id)
		}
		return nil
	case errors.Is(err, errBadRecord):
		// It can never run, nor its owner read it: the sweep deletes
		// it, and nobody looks for it every tick meanwhile.
		a.logger.Error("the record of an async batch is damaged; it is no longer looked after", zap.String("id", id), zap.Error(err))
		a.store.deactivate(id)
		return nil
	case err != nil:
		return err
	case rec.final():
		return a.adoptEvent(ctx, id, self, identity)
	case !now().Before(rec.ExpiresAt):
		return nil // the sweep deletes it
	}
	if a.leased(ctx, id) {
		return nil
	}
	spec, err := a.store.loadSpec(ctx, id)
	if errors.Is(err, errBadRecord) || errors.Is(err, fs.ErrNotExist) {
		return a.failUnreadable(ctx, id, err)
	}
	if err != nil {
		return err
	}
	ep, ok := a.servesJob(spec, self, identity)
	if !ok {
		return nil
	}
	l, err := a.takeLease(ctx, id, false)
	if err != nil || l == nil {
		return err
	}
	// Read again under the lease: the last holder may have stored more.
	if rec, err = a.store.loadJob(ctx, id); err != nil || rec.final() {
		l.release(ctx)
		return err
	}
	j := &job{a: a, endpoint: spec.Endpoint, spec: spec, lease: l, rec: rec}
	inherited, err := a.store.openHeaders(spec, id)
	if err != nil {
		a.failJob(j, "cannot resume: "+err.Error())
		return nil
	}
	j.rn = a.jobRunner(ep, id, rec.Owner, spec.Conn.facts(spec.Path), inherited)
	if !a.pool.adopt(j) {
		l.release(ctx)
		return nil
	}
	a.logger.Info("async batch taken over", zap.String("id", id), zap.Int("completed", rec.Completed))
	return nil
}

// failUnreadable ends job id, whose operations can no longer be read, in
// error: it would otherwise wait in the queue for ever.
func (a *asyncJobs) failUnreadable(ctx context.Context, id string, why error) error {
	l, err := a.takeLease(ctx, id, false)
	if err != nil || l == nil {
		return err
	}
	rec, err := a.store.loadJob(ctx, id) // again, under the lease
	if err != nil || rec.final() {
		l.release(ctx)
		return err
	}
	a.failJob(&job{a: a, lease: l, rec: rec}, "its operations can no longer be read: "+why.Error())
	return nil
}

// leased reports whether another instance holds the lease of job id: a
// cheap look before the lock.
func (a *asyncJobs) leased(ctx context.Context, id string) bool {
	cur, err := a.store.loadLease(ctx, id)
	return err == nil && cur.Instance != a.pool.instance && now().Before(cur.ExpiresAt)
}

// servesJob reports whether the job stored with spec runs through this
// handler, and the endpoint it runs through: the one that serves its
// endpoint now, or, until one has served a request, the handler at the
// same place in the config with the same config.
func (a *asyncJobs) servesJob(spec *jobSpec, self endpoint, identity string) (endpoint, bool) {
	if ep, ok := a.pool.endpointAt(spec.Endpoint); ok && ep.h.ctx.Err() == nil {
		return ep, ep.h == a.h
	}
	return self, spec.Handler != "" && spec.Handler == identity
}

// adoptEvent takes over an ended job whose webhook event was not
// delivered, and delivers it.
func (a *asyncJobs) adoptEvent(ctx context.Context, id string, self endpoint, identity string) error {
	if _, err := a.store.loadEvent(ctx, id); errors.Is(err, fs.ErrNotExist) {
		a.store.deactivate(id)
		return nil
	} else if err != nil {
		return err
	}
	if a.cfg.Webhook == nil || a.leased(ctx, id) {
		return nil
	}
	spec, err := a.store.loadSpec(ctx, id)
	if err != nil {
		return err
	}
	if _, ok := a.servesJob(spec, self, identity); !ok {
		return nil
	}
	l, err := a.takeLease(ctx, id, false)
	if err != nil || l == nil {
		return err
	}
	ev, err := a.store.loadEvent(ctx, id) // again, under the lease
	if err != nil {
		l.release(ctx)
		if errors.Is(err, fs.ErrNotExist) {
			a.store.deactivate(id)
			return nil
		}
		return err
	}
	a.logger.Info("delivering the webhook event of an async batch taken over", zap.String("id", id), zap.String("event", ev.ID))
	a.sendEnd(a.pool, id, l, ev)
	return nil
}
