package batch

import (
	"context"
	"errors"
	"io/fs"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// Everything stored expires. One sweep, at provisioning (configs may be
// reloaded more often than a sweep comes) and then every quarter of the
// retention (1s to 1h), deletes what has: idempotent answers, and with
// async batches the jobs and their index entries; and it ends the jobs
// whose window passed in the queue.

// startSweeping starts the sweep, until Cleanup stops it.
func (h *Handler) startSweeping(ctx caddy.Context) {
	h.stopSweeping = func() {}
	if h.storage == nil {
		return // a handler provisioned by hand, in unit tests
	}
	sweepCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(min(max(h.retention()/4, time.Second), time.Hour))
		defer tick.Stop()
		for {
			h.sweepAnswers(sweepCtx)
			h.sweepPacing(sweepCtx)
			if h.jobs != nil {
				h.jobs.sweep(sweepCtx)
			}
			select {
			case <-sweepCtx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	// Caddy cleans up a handler that fails validation before it ends the
	// context; the wait lets no sweep outlive its config.
	h.stopSweeping = func() {
		cancel()
		select {
		case <-done:
		case <-time.After(storageTimeout):
		}
	}
}

// sweep ends the jobs whose window passed in a queue, deletes the jobs
// that have expired, and the owners' index entries whose job is gone.
func (a *asyncJobs) sweep(ctx context.Context) {
	a.pool.sweepQueue()
	a.sweepClusterQueue(ctx)
	a.deleteExpired(ctx)
	a.sweepIndex(ctx)
}

// sweepClusterQueue ends the jobs whose time ran out in the cluster's
// queue, as a look does when a worker is free.
func (a *asyncJobs) sweepClusterQueue(ctx context.Context) {
	t := now()
	for _, k := range a.store.jobIDs(ctx, queuePrefix) {
		if q, ok := parseQueued(k); ok && !t.Before(q.expires) && !a.foreign(q.id) {
			a.expireQueued(ctx, q)
		}
	}
}

func (a *asyncJobs) deleteExpired(ctx context.Context) {
	for _, id := range a.store.jobIDs(ctx, jobsPrefix) {
		rec, err := a.store.loadJob(ctx, id)
		switch {
		case err == nil:
			if !now().After(rec.ExpiresAt) {
				a.reindex(ctx, &rec)
				continue
			}
		case errors.Is(err, fs.ErrNotExist) || errors.Is(err, errBadRecord):
			// No record says when it expires, but no job lives longer
			// than retention: keys older than that belong to none.
			if !a.store.idleFor(ctx, jobKey(id), time.Duration(a.cfg.Retention)) {
				continue
			}
		default:
			continue // storage trouble: next time
		}
		if derr := deleteTree(ctx, a.store, jobKey(id)); derr != nil {
			a.logger.Warn("deleting expired batch job", zap.String("id", id), zap.Error(derr))
			continue
		}
		if err == nil { // its entry, which the record names
			a.store.unindexJob(ctx, &rec)
		}
	}
}

// reindex writes the index entry of a job that has none: one stored
// before there was an index, or whose entry storage lost.
func (a *asyncJobs) reindex(ctx context.Context, rec *jobRecord) {
	if rec.Owner == "" || a.store.Exists(ctx, indexKey(rec)) {
		return
	}
	if err := a.store.indexJob(ctx, rec); err != nil {
		a.logger.Warn("indexing an async batch", zap.String("id", rec.ID), zap.Error(err))
	}
}

// storageOf returns ctx's storage, or nil when ctx has no config (a
// handler provisioned by hand in unit tests): Storage then panics, and
// caddy.Context tells it no other way.
func storageOf(ctx caddy.Context) (s certmagic.Storage) {
	defer func() { _ = recover() }()
	return ctx.Storage()
}

// sweepAnswers deletes the idempotent answers that have expired.
func (h *Handler) sweepAnswers(ctx context.Context) {
	s := h.storage
	names, err := s.List(ctx, idempotencyPrefix, false)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			h.logger.Warn("listing idempotent answers", zap.Error(err))
		}
		return
	}
	retention := h.retention()
	for _, name := range names {
		if ctx.Err() != nil {
			return
		}
		// Stat spares loading what was written within the retention; one a
		// shorter retention stored waits for a later sweep (it is not
		// replayed once expired).
		if info, err := s.Stat(ctx, name); err == nil && now().Sub(info.Modified) < retention {
			continue
		}
		h.deleteIfExpired(ctx, s, name)
	}
}

// deleteIfExpired deletes the answer at name if it has expired or cannot
// be read. It holds the key's locks, as a request may be replacing the
// answer; a key in use is left to a later sweep.
func (h *Handler) deleteIfExpired(ctx context.Context, s *store, name string) {
	unlock, ok := h.keyLocks.tryLock(name)
	if !ok {
		return
	}
	defer unlock()
	lockCtx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := s.Lock(lockCtx, name); err != nil {
		return
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storageTimeout)
		defer cancel()
		if err := s.Unlock(ctx, name); err != nil {
			h.logger.Error("unlocking idempotency key", zap.Error(err))
		}
	}()
	buf, err := s.Load(ctx, name)
	if err != nil {
		return
	}
	if ans, err := decodeAnswer(buf); err == nil && now().Before(ans.ExpiresAt) {
		return
	}
	if err := s.Delete(ctx, name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		h.logger.Warn("deleting expired idempotent answer", zap.Error(err))
	}
}
