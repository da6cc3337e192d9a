package batch

import (
	"context"
	"errors"
	"fmt"
	"path"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// A job runs, or waits in memory (spec.Local), on the instance that holds
// it. Each handler holds its jobs under an epoch of its own: a heartbeat,
// batch/held/<epoch>/heartbeat, which it renews every quarter of the lease
// while it holds anything, and one key per job beside it,
// batch/held/<epoch>/<id>. A renewal is two storage calls however many
// jobs it holds: the heartbeat stored, and the epoch listed, so that a job
// taken from it (its key gone) stops there and then. The job's holder key,
// batch/jobs/<id>/holder, names the epoch that last took it: written once,
// never renewed. A job that any instance can run holds no lease while it
// waits: it waits in the cluster's queue (queue.go).
//
// Another instance takes a job over once the heartbeat of the epoch
// holding it has expired (or is gone), under the job's lock, and only if
// the job's holder key still names that epoch. The holder stores its
// heartbeat only while it has a fifth of the lease left; one it could not
// renew by then it gives up, stopping every job it holds before a peer may
// take them, and it holds the next ones under a new epoch: an epoch that
// expired never comes back, and an instance looking for work lists only
// the jobs of the epochs that did.

var (
	errLeaseLost     = errors.New("the job was taken over by another instance")
	errHoldExpiring  = errors.New("the heartbeat of this instance could not be renewed: it takes no more jobs until it is")
	errAlreadyLeased = errors.New("job already held here")
)

func (a *asyncJobs) leaseLength() time.Duration { return time.Duration(a.cfg.Lease) }

// hold is a handler's hold on the jobs it has taken.
type hold struct {
	a       *asyncJobs
	mu      sync.Mutex
	epoch   string    // "" while it holds nothing, and after its heartbeat expired
	expires time.Time // of the last heartbeat stored
	leases  map[string]*lease
	adding  int // jobs being listed under the epoch: it is not empty
}

// lease is one job's place in the hold of the handler running it.
type lease struct {
	h        *hold
	id       string
	epoch    string
	gone     atomic.Bool // taken over by another instance, or given up
	released atomic.Bool
	lostCh   chan struct{}
	lostOnce sync.Once
}

// add holds job id, which nobody else runs: a fresh one, or one taken
// under its lock. It starts an epoch, and its heartbeat, if none runs.
func (h *hold) add(ctx context.Context, id string) (*lease, error) {
	a, length := h.a, h.a.leaseLength()
	h.mu.Lock()
	if h.leases[id] != nil {
		h.mu.Unlock()
		return nil, errAlreadyLeased
	}
	switch {
	case h.epoch == "":
		// The heartbeat is stored before any job is listed under it: an
		// epoch listed without one is dead.
		epoch, t := newBatchID(), now()
		if err := a.store.storeHeartbeat(ctx, epoch, t.Add(length*4/5)); err != nil {
			h.mu.Unlock()
			return nil, fmt.Errorf("storing heartbeat: %w", err)
		}
		h.epoch, h.expires = epoch, t.Add(length*4/5)
		if h.leases == nil {
			h.leases = map[string]*lease{}
		}
		go h.renew(a.pool.leases, epoch)
	case h.expires.Sub(now()) < length/5:
		h.mu.Unlock()
		return nil, errHoldExpiring
	}
	epoch := h.epoch
	h.adding++
	h.mu.Unlock()

	err := a.store.storeHolder(ctx, id, epoch)
	if err == nil {
		err = a.store.Store(ctx, heldKey(epoch, id), []byte(id))
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.adding--
	l := &lease{h: h, id: id, epoch: epoch, lostCh: make(chan struct{})}
	switch {
	case err != nil:
		return nil, err
	case h.epoch != epoch:
		// Given up meanwhile: the job is listed under a dead epoch, where
		// a peer finds it.
		return nil, errHoldExpiring
	}
	h.leases[id] = l
	return l, nil
}

// renew renews the heartbeat of epoch until it has nothing left to hold,
// can no longer be renewed in time, or ctx ends. It takes no lock: a peer
// takes over only an epoch whose heartbeat has expired, and this one
// stores it only while a fifth of the lease is left.
func (h *hold) renew(ctx context.Context, epoch string) {
	a, length := h.a, h.a.leaseLength()
	tick := time.NewTicker(max(length/4, 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			h.retireIfEmpty(epoch)
			return
		case <-tick.C:
		}
		h.mu.Lock()
		switch {
		case h.epoch != epoch:
			h.mu.Unlock()
			return
		case len(h.leases) == 0 && h.adding == 0:
			h.mu.Unlock()
			h.retireIfEmpty(epoch)
			return
		case h.expires.Sub(now()) < length/5:
			lost := h.leases
			h.epoch, h.leases = "", map[string]*lease{}
			h.mu.Unlock()
			a.logger.Error("the heartbeat of this instance could not be renewed in time: giving up the async batches it holds",
				zap.String("epoch", epoch), zap.Int("jobs", len(lost)))
			for _, l := range lost {
				l.lose()
			}
			return
		}
		h.mu.Unlock()
		t := now()
		if err := a.store.storeHeartbeat(ctx, epoch, t.Add(length*4/5)); err != nil {
			if ctx.Err() == nil {
				a.logger.Warn("renewing the heartbeat of this instance", zap.String("epoch", epoch), zap.Error(err))
			}
			continue
		}
		h.mu.Lock()
		if h.epoch == epoch {
			h.expires = t.Add(length * 4 / 5)
		}
		held := make([]*lease, 0, len(h.leases))
		for _, l := range h.leases {
			held = append(held, l)
		}
		h.mu.Unlock()
		a.pool.renewals.Add(1)
		// A job whose key is gone was taken over by a peer that found the
		// heartbeat expired (a clock ahead, renewals that came late).
		keys, err := a.store.List(ctx, heldDir(epoch), false)
		if err != nil {
			if ctx.Err() == nil {
				a.logger.Warn("listing the async batches this instance holds", zap.String("epoch", epoch), zap.Error(err))
			}
			continue
		}
		listed := make(map[string]bool, len(keys))
		for _, k := range keys {
			listed[path.Base(k)] = true
		}
		for _, l := range held {
			if !listed[l.id] && h.drop(l) {
				a.logger.Warn("an async batch held here was taken over by another instance", zap.String("id", l.id))
				l.lose()
			}
		}
	}
}

// retireIfEmpty ends epoch if it holds nothing: its jobs' keys and its
// heartbeat go, and the next job taken starts a new one.
func (h *hold) retireIfEmpty(epoch string) {
	h.mu.Lock()
	if h.epoch != epoch || len(h.leases) > 0 || h.adding > 0 {
		h.mu.Unlock()
		return
	}
	h.epoch = ""
	h.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	if err := deleteTree(ctx, h.a.store, heldDir(epoch)); err != nil {
		h.a.logger.Warn("deleting the heartbeat of this instance", zap.String("epoch", epoch), zap.Error(err))
	}
}

// drop takes l out of the hold if it is still there.
func (h *hold) drop(l *lease) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.leases[l.id] != l {
		return false
	}
	delete(h.leases, l.id)
	return true
}

// current returns the epoch the hold runs under now, "" if none.
func (h *hold) current() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.epoch
}

func (a *asyncJobs) unlock(name string) {
	if err := a.store.Unlock(context.Background(), name); err != nil {
		a.logger.Warn("unlocking", zap.String("lock", name), zap.Error(err))
	}
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

// release lets go of the job: its key under the epoch goes, unless it was
// lost, when it is no longer this instance's to delete. The job must be
// queued again, or ended, first: released, nobody holds it.
func (l *lease) release(ctx context.Context) {
	if !l.released.CompareAndSwap(false, true) || !l.h.drop(l) || l.lost() {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storeTimeout)
	defer cancel()
	l.h.a.store.deleteKey(ctx, heldKey(l.epoch, l.id))
}
