package batch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// A job is run by the instance that holds its lease in storage: its
// instance id and an expiry, renewed while the job is queued or runs
// there. Any instance serving the job's endpoint takes over a job whose
// lease has expired (or was released, at a graceful shutdown), under
// storage's lock so that one does, and resumes it at its first operation
// without a stored result.

// leaseRecord is what storage holds of a lease.
type leaseRecord struct {
	Instance  string    `json:"instance"`
	ExpiresAt time.Time `json:"expires_at"`
}

// Where the jobs that have not ended are listed, one key each, so that
// looking for jobs to take over reads those, not every job retained.
const activePrefix = "batch/active"

func leaseKey(id string) string  { return jobKey(id, "lease") }
func activeKey(id string) string { return path.Join(activePrefix, id) }

var errLeaseLost = errors.New("the job was taken over by another instance")

// lease is this instance's hold on a job.
type lease struct {
	h        *Handler
	id       string
	instance string
	stop     context.CancelFunc
	done     chan struct{}
	gone     atomic.Bool // taken over by another instance
	expires  time.Time   // of the last renewal stored; the renewer's
	lostCh   chan struct{}
	lostOnce sync.Once
}

func (h *Handler) leaseLength() time.Duration { return time.Duration(h.Async.Lease) }

// takeLease takes the lease of job id unless another instance holds it;
// a fresh job, which nobody else knows of, takes it without the lock.
// It returns nil and no error when another instance holds it.
func (h *Handler) takeLease(ctx context.Context, id string, fresh bool) (*lease, error) {
	p := h.pool
	if !fresh {
		if err := h.storage.Lock(ctx, leaseKey(id)); err != nil {
			return nil, fmt.Errorf("locking lease: %w", err)
		}
		defer h.unlock(leaseKey(id))
		cur, err := h.loadLease(ctx, id)
		switch {
		case err == nil && cur.Instance != p.instance && now().Before(cur.ExpiresAt):
			return nil, nil
		case err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, errBadRecord):
			return nil, err
		}
	}
	t := now()
	if err := h.storeLease(ctx, id, p.instance); err != nil {
		return nil, err
	}
	lctx, stop := context.WithCancel(p.leases)
	l := &lease{h: h, id: id, instance: p.instance, stop: stop, done: make(chan struct{}), lostCh: make(chan struct{}),
		expires: t.Add(h.leaseLength() * 4 / 5)}
	go l.renew(lctx)
	return l, nil
}

func (h *Handler) unlock(name string) {
	if err := h.storage.Unlock(context.Background(), name); err != nil {
		h.logger.Warn("unlocking", zap.String("lock", name), zap.Error(err))
	}
}

// A lease is renewed every quarter of its length, and each renewal lasts
// four fifths of it, so that a dead instance's jobs are free within the
// lease, found by a look for them every tenth of it.
func (h *Handler) storeLease(ctx context.Context, id, instance string) error {
	buf, _ := json.Marshal(leaseRecord{Instance: instance, ExpiresAt: now().Add(h.leaseLength() * 4 / 5)})
	return h.storage.Store(ctx, leaseKey(id), buf)
}

func (h *Handler) loadLease(ctx context.Context, id string) (leaseRecord, error) {
	var l leaseRecord
	buf, err := h.storage.Load(ctx, leaseKey(id))
	if err != nil {
		return l, err
	}
	if err := json.Unmarshal(buf, &l); err != nil {
		return l, fmt.Errorf("%w: lease of %s: %w", errBadRecord, id, err)
	}
	return l, nil
}

// renew renews the lease until it is released or lost. It takes no lock:
// an instance takes over only a lease that has expired, and this one
// writes only while its lease has a fifth of its length left; a lease it
// could not renew by then it gives up, and stops the job, before another
// instance can take it.
func (l *lease) renew(ctx context.Context) {
	defer close(l.done)
	length := l.h.leaseLength()
	tick := time.NewTicker(max(length/4, 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if l.expires.Sub(now()) < length/5 {
			l.h.logger.Error("the lease of an async batch could not be renewed in time: giving it up", zap.String("id", l.id))
			l.lose()
			return
		}
		err := l.renewOnce(ctx)
		switch {
		case errors.Is(err, errLeaseLost):
			l.lose()
			return
		case err != nil && ctx.Err() == nil:
			l.h.logger.Warn("renewing the lease of an async batch", zap.String("id", l.id), zap.Error(err))
		}
	}
}

func (l *lease) renewOnce(ctx context.Context) error {
	h := l.h
	cur, err := h.loadLease(ctx, l.id)
	switch {
	case err == nil && cur.Instance != l.instance:
		return errLeaseLost
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return err
	}
	t := now()
	if err := h.storeLease(ctx, l.id, l.instance); err != nil {
		return err
	}
	l.expires = t.Add(h.leaseLength() * 4 / 5)
	return nil
}

func (l *lease) lose() {
	l.gone.Store(true)
	l.lostOnce.Do(func() { close(l.lostCh) })
}

func (l *lease) lost() bool { return l.gone.Load() }

// watch returns ctx, ended with errLeaseLost if the lease is lost.
func (l *lease) watch(ctx context.Context) context.Context {
	ctx, cancel := context.WithCancelCause(ctx)
	go func() {
		select {
		case <-l.lostCh:
			cancel(errLeaseLost)
		case <-ctx.Done():
		}
	}()
	return ctx
}

// release stops renewing the lease and deletes it, if it is still this
// instance's, so that another instance takes the job over at once. A
// lease that has not expired is this instance's to delete.
func (l *lease) release(ctx context.Context) {
	l.stop()
	<-l.done
	if l.lost() {
		return
	}
	h := l.h
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storeTimeout)
	defer cancel()
	if cur, err := h.loadLease(ctx, l.id); err == nil && cur.Instance == l.instance {
		if err := h.storage.Delete(ctx, leaseKey(l.id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			h.logger.Warn("releasing the lease of an async batch", zap.String("id", l.id), zap.Error(err))
		}
	}
}

// activate lists a job among those that have not ended.
func (h *Handler) activate(ctx context.Context, id string) error {
	return h.storage.Store(ctx, activeKey(id), []byte(id))
}

// deactivate takes an ended job off the list.
func (h *Handler) deactivate(id string) {
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	if err := h.storage.Delete(ctx, activeKey(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		h.logger.Warn("deactivating an async batch", zap.String("id", id), zap.Error(err))
	}
}

// adoptEvery is how often an instance looks for jobs to take over: a
// tenth of the lease, within bounds.
func (h *Handler) adoptEvery() time.Duration {
	return min(max(h.leaseLength()/10, 50*time.Millisecond), 5*time.Second)
}

// adoptJobs takes over, while ctx lasts, the jobs whose lease has expired
// or was released, as long as this instance has a worker free for them.
func (h *Handler) adoptJobs(ctx context.Context) {
	tick := time.NewTicker(h.adoptEvery())
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		h.adopt(ctx)
	}
}

func (h *Handler) adopt(ctx context.Context) {
	p := h.pool
	if !p.hasRoom() {
		return
	}
	self, identity, ok := h.self()
	if !ok {
		return // not serving yet
	}
	for _, id := range h.jobIDs(ctx, activePrefix) {
		if ctx.Err() != nil || !p.hasRoom() {
			return
		}
		if p.lookup(id) != nil {
			continue
		}
		if err := h.adoptOne(ctx, id, self, identity); err != nil {
			h.logger.Warn("taking over an async batch", zap.String("id", id), zap.Error(err))
		}
	}
}

// adoptOne takes over job id if it is this handler's and free.
func (h *Handler) adoptOne(ctx context.Context, id string, self endpoint, identity string) error {
	rec, err := h.loadJob(ctx, id)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// Swept, or never stored whole: nothing is left to run.
		if h.idleFor(ctx, activeKey(id), h.leaseLength()) {
			h.deactivate(id)
		}
		return nil
	case err != nil:
		return err
	case rec.final():
		return h.adoptEvent(ctx, id, self, identity)
	case !now().Before(rec.ExpiresAt):
		return nil // the sweep deletes it
	}
	if h.leased(ctx, id) {
		return nil
	}
	spec, err := h.loadSpec(ctx, id)
	if err != nil {
		return err
	}
	ep, ok := h.servesJob(spec, self, identity)
	if !ok {
		return nil
	}
	l, err := h.takeLease(ctx, id, false)
	if err != nil || l == nil {
		return err
	}
	// Read again under the lease: the last holder may have stored more.
	if rec, err = h.loadJob(ctx, id); err != nil || rec.final() {
		l.release(ctx)
		return err
	}
	j := &job{h: h, endpoint: spec.Endpoint, spec: spec, lease: l, rec: rec}
	inherited, err := h.openHeaders(spec, id)
	if err != nil {
		h.failJob(j, "cannot resume: "+err.Error())
		return nil
	}
	j.rn = h.jobRunner(ep, id, spec.Conn.facts(spec.Path), inherited)
	if !h.pool.adopt(j) {
		l.release(ctx)
		return nil
	}
	h.logger.Info("async batch taken over", zap.String("id", id), zap.Int("completed", rec.Completed))
	return nil
}

// leased reports whether another instance holds the lease of job id: a
// cheap look before the lock.
func (h *Handler) leased(ctx context.Context, id string) bool {
	cur, err := h.loadLease(ctx, id)
	return err == nil && cur.Instance != h.pool.instance && now().Before(cur.ExpiresAt)
}

// servesJob reports whether the job stored with spec runs through this
// handler, and the endpoint it runs through: the one that serves its
// endpoint now, or, until one has served a request, the handler at the
// same place in the config with the same config.
func (h *Handler) servesJob(spec *jobSpec, self endpoint, identity string) (endpoint, bool) {
	if ep, ok := h.pool.endpointAt(spec.Endpoint); ok && ep.h.ctx.Err() == nil {
		return ep, ep.h == h
	}
	return self, spec.Handler != "" && spec.Handler == identity
}

// failJob ends a job that cannot run, and says why.
func (h *Handler) failJob(j *job, why string) {
	t := now()
	j.rec.Status, j.rec.Error, j.rec.UpdatedAt, j.rec.CompletedAt = jobError, why, &t, &t
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	if j.event = h.endEvent(j.rec); j.event != nil {
		if err := h.storeEvent(ctx, j.rec.ID, j.event); err != nil {
			h.logger.Error("storing the webhook event of an async batch", zap.String("id", j.rec.ID), zap.Error(err))
		}
	}
	if err := j.save(ctx); err != nil {
		h.logger.Error("storing the end of an async batch", zap.String("id", j.rec.ID), zap.Error(err))
	}
	h.metrics.jobs.WithLabelValues(jobError).Inc()
	h.logger.Error("async batch ended", zap.String("id", j.rec.ID), zap.String("status", jobError), zap.String("error", why))
	h.pool.ended(j)
}

// adoptEvent takes over an ended job whose webhook event was not
// delivered, and delivers it.
func (h *Handler) adoptEvent(ctx context.Context, id string, self endpoint, identity string) error {
	if _, err := h.loadEvent(ctx, id); errors.Is(err, fs.ErrNotExist) {
		h.deactivate(id)
		return nil
	} else if err != nil {
		return err
	}
	if h.Async.Webhook == nil || h.leased(ctx, id) {
		return nil
	}
	spec, err := h.loadSpec(ctx, id)
	if err != nil {
		return err
	}
	if _, ok := h.servesJob(spec, self, identity); !ok {
		return nil
	}
	l, err := h.takeLease(ctx, id, false)
	if err != nil || l == nil {
		return err
	}
	ev, err := h.loadEvent(ctx, id) // again, under the lease
	if err != nil {
		l.release(ctx)
		if errors.Is(err, fs.ErrNotExist) {
			h.deactivate(id)
			return nil
		}
		return err
	}
	h.logger.Info("delivering the webhook event of an async batch taken over", zap.String("id", id), zap.String("event", ev.ID))
	h.sendEnd(h.pool, id, l, ev)
	return nil
}

func (h *Handler) loadSpec(ctx context.Context, id string) (*jobSpec, error) {
	buf, err := h.storage.Load(ctx, jobKey(id, "spec"))
	if err != nil {
		return nil, err
	}
	spec := new(jobSpec)
	if err := json.Unmarshal(buf, spec); err != nil || len(spec.Starts) == 0 {
		return nil, fmt.Errorf("%w: spec of %s: %v", errBadRecord, id, err)
	}
	return spec, nil
}
