package batch

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
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

var errLeaseLost = errors.New("the job was taken over by another instance")

// lease is this instance's hold on a job.
type lease struct {
	a        *asyncJobs
	id       string
	instance string
	stop     context.CancelFunc
	done     chan struct{}
	gone     atomic.Bool // taken over by another instance
	expires  time.Time   // of the last renewal stored; the renewer's
	lostCh   chan struct{}
	lostOnce sync.Once
}

func (a *asyncJobs) leaseLength() time.Duration { return time.Duration(a.cfg.Lease) }

// takeLease takes the lease of job id unless another instance holds it;
// a fresh job, which nobody else knows of, takes it without the lock.
// It returns nil and no error when another instance holds it.
func (a *asyncJobs) takeLease(ctx context.Context, id string, fresh bool) (*lease, error) {
	p := a.pool
	if !fresh {
		if err := a.store.Lock(ctx, leaseKey(id)); err != nil {
			return nil, fmt.Errorf("locking lease: %w", err)
		}
		defer a.unlock(leaseKey(id))
		cur, err := a.store.loadLease(ctx, id)
		switch {
		case err == nil && cur.Instance != p.instance && now().Before(cur.ExpiresAt):
			return nil, nil
		case err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, errBadRecord):
			return nil, err
		}
	}
	t := now()
	if err := a.store.storeLease(ctx, id, p.instance, t.Add(a.leaseLength()*4/5)); err != nil {
		return nil, err
	}
	lctx, stop := context.WithCancel(p.leases)
	l := &lease{a: a, id: id, instance: p.instance, stop: stop, done: make(chan struct{}), lostCh: make(chan struct{}),
		expires: t.Add(a.leaseLength() * 4 / 5)}
	go l.renew(lctx)
	return l, nil
}

func (a *asyncJobs) unlock(name string) {
	if err := a.store.Unlock(context.Background(), name); err != nil {
		a.logger.Warn("unlocking", zap.String("lock", name), zap.Error(err))
	}
}

// renew renews the lease until it is released or lost. It takes no lock:
// an instance takes over only a lease that has expired, and this one
// writes only while its lease has a fifth of its length left; a lease it
// could not renew by then it gives up, and stops the job, before another
// instance can take it.
func (l *lease) renew(ctx context.Context) {
	defer close(l.done)
	length := l.a.leaseLength()
	tick := time.NewTicker(max(length/4, 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if l.expires.Sub(now()) < length/5 {
			l.a.logger.Error("the lease of an async batch could not be renewed in time: giving it up", zap.String("id", l.id))
			l.lose()
			return
		}
		err := l.renewOnce(ctx)
		switch {
		case errors.Is(err, errLeaseLost):
			l.lose()
			return
		case err != nil && ctx.Err() == nil:
			l.a.logger.Warn("renewing the lease of an async batch", zap.String("id", l.id), zap.Error(err))
		}
	}
}

func (l *lease) renewOnce(ctx context.Context) error {
	a := l.a
	cur, err := a.store.loadLease(ctx, l.id)
	switch {
	case err == nil && cur.Instance != l.instance:
		return errLeaseLost
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return err
	}
	t := now()
	if err := a.store.storeLease(ctx, l.id, l.instance, t.Add(a.leaseLength()*4/5)); err != nil {
		return err
	}
	l.expires = t.Add(a.leaseLength() * 4 / 5)
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
	a := l.a
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storeTimeout)
	defer cancel()
	if cur, err := a.store.loadLease(ctx, l.id); err == nil && cur.Instance == l.instance {
		if err := a.store.Delete(ctx, leaseKey(l.id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			a.logger.Warn("releasing the lease of an async batch", zap.String("id", l.id), zap.Error(err))
		}
	}
}
