package batch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"time"

	"go.uber.org/zap"
)

// adoptEvery is how often an instance looks for work: a tenth of the
// lease, within bounds.
func (a *asyncJobs) adoptEvery() time.Duration {
	return min(max(a.leaseLength()/10, 50*time.Millisecond), 5*time.Second)
}

// deadEpochGrace is how long after its heartbeat expired an epoch that
// holds nothing more is deleted: long past any write it had in flight.
const deadEpochGrace = 2 * storeTimeout

// adoptJobs looks for work while ctx lasts: every tick, the jobs of dead
// epochs and the cluster's queue; when woken (a worker freed, a job
// queued), the queue.
func (a *asyncJobs) adoptJobs(ctx context.Context) {
	tick := time.NewTicker(a.adoptEvery())
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			a.pool.looks.Add(1)
			a.migrateActive(ctx)
			a.takeOver(ctx)
			a.lookQueue(ctx, true)
		case <-a.woken:
			a.lookQueue(ctx, false)
		}
	}
}

// takeOver takes over, as long as a worker is free, the jobs of the epochs
// whose heartbeat has expired or is gone. A look costs one List of the
// epochs and one Load of each one's heartbeat (the instances holding jobs:
// a handful), and one List of each dead epoch's jobs: it grows with the
// jobs whose holder is gone, not with the jobs held.
func (a *asyncJobs) takeOver(ctx context.Context) {
	p := a.pool
	if !p.hasRoom() {
		return
	}
	self, identity, ok := a.self()
	if !ok {
		return // not serving yet
	}
	mine := a.hold.current()
	for _, epoch := range a.store.jobIDs(ctx, heldPrefix) {
		if epoch == mine || !isJobID(epoch) {
			continue
		}
		hb, err := a.store.loadHeartbeat(ctx, epoch)
		switch {
		case err == nil && now().Before(hb.ExpiresAt):
			continue
		case err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, errBadRecord):
			continue // storage trouble: next look
		}
		var ids []string
		beating := false
		for _, k := range a.store.jobIDs(ctx, heldDir(epoch)) {
			switch {
			case k == heartbeatName:
				beating = true
			case isJobID(k):
				ids = append(ids, k)
			}
		}
		switch {
		case errors.Is(err, fs.ErrNotExist) && beating:
			continue // its first heartbeat was stored since: it starts now
		case len(ids) == 0:
			// Retired, or emptied by takeovers: what is left of it goes
			// once no write of its could still land.
			if errors.Is(err, fs.ErrNotExist) || now().Sub(hb.ExpiresAt) > deadEpochGrace {
				if err := deleteTree(ctx, a.store, heldDir(epoch)); err != nil {
					a.logger.Warn("deleting a dead epoch", zap.String("epoch", epoch), zap.Error(err))
				}
			}
			continue
		}
		for _, id := range ids {
			if ctx.Err() != nil || !p.hasRoom() {
				return
			}
			if p.holds(id) || a.foreign(id) {
				continue
			}
			if err := a.takeOverOne(ctx, epoch, id, self, identity); err != nil {
				a.logger.Warn("taking over an async batch", zap.String("id", id), zap.Error(err))
			}
		}
	}
}

// Before heartbeats, the jobs that had not ended were listed under
// batch/active, each with a lease of its own in batch/jobs/<id>/lease.
const legacyActivePrefix = "batch/active"

// legacyLease is what an older version stored of a job's lease.
type legacyLease struct {
	ExpiresAt time.Time `json:"expires_at"`
}

// migrateActive moves the jobs an older version left listed as active
// into the cluster's queue, once their lease has expired or was released
// (a graceful stop releases them): an instance of this version then runs
// them. Each handler looks until it finds none; from then on it costs
// nothing. Instances of both versions must not share a storage: the older
// ones do not see the queue, nor the heartbeats.
func (a *asyncJobs) migrateActive(ctx context.Context) {
	if a.migrated.Load() {
		return
	}
	keys, err := a.store.List(ctx, legacyActivePrefix, false)
	switch {
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return
	case len(keys) == 0:
		a.migrated.Store(true)
		return
	}
	for _, k := range keys {
		if id := path.Base(k); isJobID(id) {
			a.migrateOne(ctx, id)
		}
	}
}

func (a *asyncJobs) migrateOne(ctx context.Context, id string) {
	active, lease := path.Join(legacyActivePrefix, id), jobKey(id, "lease")
	if buf, err := a.store.Load(ctx, lease); err == nil {
		var l legacyLease
		if json.Unmarshal(buf, &l) == nil && now().Before(l.ExpiresAt) {
			return // an instance of the older version runs it
		}
	}
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	if err := a.store.Lock(ctx, holderKey(id)); err != nil {
		return
	}
	defer a.unlock(holderKey(id))
	if !a.store.Exists(ctx, active) {
		return // moved by another instance meanwhile
	}
	rec, err := a.store.loadJob(ctx, id)
	if err == nil && (!rec.final() || a.store.Exists(ctx, eventKey(id))) {
		err = a.store.enqueue(ctx, rec)
	} else if errors.Is(err, fs.ErrNotExist) || errors.Is(err, errBadRecord) {
		err = nil // nothing to run: the sweep deletes what is left
	}
	if err != nil {
		a.logger.Warn("moving an async batch of an older version to the queue", zap.String("id", id), zap.Error(err))
		return
	}
	a.store.deleteKey(ctx, lease)
	a.store.deleteKey(ctx, active)
	a.logger.Info("async batch of an older version queued", zap.String("id", id))
}

// takeOverOne takes over job id from the dead epoch from, if it is this
// handler's.
func (a *asyncJobs) takeOverOne(ctx context.Context, from, id string, self endpoint, identity string) error {
	rec, err := a.store.loadJob(ctx, id)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// Swept: nothing is left to run.
		a.store.deleteKey(ctx, heldKey(from, id))
		return nil
	case errors.Is(err, errBadRecord):
		// It can never run, nor its owner read it: the sweep deletes
		// it, and nobody looks for it every look meanwhile.
		a.logger.Error("the record of an async batch is damaged; it is no longer looked after", zap.String("id", id), zap.Error(err))
		a.store.deleteKey(ctx, heldKey(from, id))
		return nil
	case err != nil:
		return err
	case rec.final():
		return a.adoptEvent(ctx, rec, from, self, identity)
	case !now().Before(rec.ExpiresAt):
		a.store.deleteKey(ctx, heldKey(from, id)) // the sweep deletes it
		return nil
	}
	spec, err := a.store.loadSpec(ctx, id)
	if errors.Is(err, errBadRecord) || errors.Is(err, fs.ErrNotExist) {
		return a.failUnreadable(ctx, rec, from, err)
	}
	if err != nil {
		return err
	}
	ep, ok := a.servesJob(spec, self, identity)
	if !ok {
		a.notMine(id)
		return nil
	}
	if !a.pool.takeWorker() {
		return nil
	}
	if a.startTaken(ctx, rec, from, queueKey(rec), spec, ep) != started {
		a.pool.freeWorker()
	}
	return nil
}

// outcome is what became of a job a look tried to start.
type outcome int

const (
	// waits: it did not start (taken by another instance, another
	// handler's): its owner's later jobs wait for it.
	waits outcome = iota
	started
	// passed: not a job to run (gone, ended and owing an event,
	// expired): its owner's next job may start in its place.
	passed
)

// startTaken takes job rec, from the dead epoch from or the queue (from
// ""), and runs it on the worker taken for it.
func (a *asyncJobs) startTaken(ctx context.Context, rec jobRecord, from, queue string, spec *jobSpec, ep endpoint) outcome {
	id := rec.ID
	l, err := a.take(ctx, id, from, queue)
	if err != nil || l == nil {
		if err != nil {
			a.logger.Warn("taking an async batch", zap.String("id", id), zap.Error(err))
		}
		return waits
	}
	// Read again under the lease: the last holder may have stored more.
	rec, err = a.store.loadJob(ctx, id)
	switch {
	case err == nil && rec.final():
		a.sendOwed(ctx, id, l)
		return passed
	case err != nil:
		if !errors.Is(err, fs.ErrNotExist) {
			a.logger.Warn("loading an async batch taken", zap.String("id", id), zap.Error(err))
		}
		l.release(ctx)
		return passed
	}
	j := &job{a: a, endpoint: spec.Endpoint, spec: spec, lease: l, rec: rec}
	inherited, err := a.store.openHeaders(spec, id)
	if err != nil {
		a.failJob(j, "cannot resume: "+err.Error())
		return passed
	}
	j.rn = a.jobRunner(ep, id, rec.Owner, spec.Conn.facts(spec.Path), inherited)
	if !now().Before(rec.ExpiresAt) {
		a.pool.expire(j)
		return passed
	}
	a.pool.startRun(j)
	if from != "" {
		a.logger.Info("async batch taken over", zap.String("id", id), zap.Int("completed", rec.Completed))
	}
	return started
}

// take holds job id, under its lock: from the dead epoch from, if the job's
// holder is still that epoch, or from the queue (from ""), if the job still
// waits at the queue key. queue, also when from is set, is where the job
// waits if a holder that took it from the queue died before it could
// delete it there. It returns nil and no error when another instance took
// the job first.
func (a *asyncJobs) take(ctx context.Context, id, from, queue string) (*lease, error) {
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	lock := holderKey(id)
	if err := a.store.Lock(ctx, lock); err != nil {
		return nil, fmt.Errorf("locking: %w", err)
	}
	defer a.unlock(lock)
	if from == "" {
		if !a.store.Exists(ctx, queue) {
			return nil, nil
		}
	} else {
		cur, err := a.store.loadHolder(ctx, id)
		switch {
		case err == nil && cur.Epoch != from:
			// Taken by another instance since: the key is a leftover.
			a.store.deleteKey(ctx, heldKey(from, id))
			return nil, nil
		case err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, errBadRecord):
			return nil, err
		}
	}
	l, err := a.hold.add(ctx, id)
	if err != nil {
		if from != "" {
			// The holder may name this instance now: give the job back
			// to the epoch it is listed under.
			_ = a.store.storeHolder(ctx, id, from)
		}
		return nil, err
	}
	if from != "" {
		a.store.deleteKey(ctx, heldKey(from, id))
	} else {
		a.pool.taken(id) // out of the cluster's queue: it counts no more here
	}
	a.store.deleteKey(ctx, queue)
	return l, nil
}

// failUnreadable ends job rec, whose operations can no longer be read, in
// error: it would otherwise wait for ever. from is the dead epoch it is
// taken from, "" for the queue.
func (a *asyncJobs) failUnreadable(ctx context.Context, rec jobRecord, from string, why error) error {
	l, err := a.take(ctx, rec.ID, from, queueKey(rec))
	if err != nil || l == nil {
		return err
	}
	rec, err = a.store.loadJob(ctx, rec.ID) // again, under the lease
	if err != nil || rec.final() {
		l.release(ctx)
		return err
	}
	a.failJob(&job{a: a, lease: l, rec: rec}, "its operations can no longer be read: "+why.Error())
	return nil
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

// maxForeign bounds the jobs remembered as another handler's.
const maxForeign = 10000

// notMine remembers that job id runs through another handler, so that
// looks do not read it again until the endpoints served change.
func (a *asyncJobs) notMine(id string) {
	gen := a.pool.endpointsGeneration()
	a.foreignMu.Lock()
	defer a.foreignMu.Unlock()
	if a.foreignIDs == nil || a.foreignGen != gen || len(a.foreignIDs) >= maxForeign {
		a.foreignIDs, a.foreignGen = map[string]bool{}, gen
	}
	a.foreignIDs[id] = true
}

// foreign reports whether job id was found to be another handler's.
func (a *asyncJobs) foreign(id string) bool {
	gen := a.pool.endpointsGeneration()
	a.foreignMu.Lock()
	defer a.foreignMu.Unlock()
	return a.foreignGen == gen && a.foreignIDs[id]
}

// adoptEvent takes over an ended job whose webhook event was not
// delivered, and delivers it; from is the dead epoch holding it, "" for
// the queue.
func (a *asyncJobs) adoptEvent(ctx context.Context, rec jobRecord, from string, self endpoint, identity string) error {
	id := rec.ID
	if _, err := a.store.loadEvent(ctx, id); errors.Is(err, fs.ErrNotExist) {
		// Nothing is owed: whoever holds or queues it lets it go.
		if from != "" {
			a.store.deleteKey(ctx, heldKey(from, id))
		} else {
			a.store.deleteKey(ctx, queueKey(rec))
		}
		return nil
	} else if err != nil {
		return err
	}
	if a.cfg.Webhook == nil {
		return nil
	}
	spec, err := a.store.loadSpec(ctx, id)
	if err != nil {
		return err
	}
	if _, ok := a.servesJob(spec, self, identity); !ok {
		a.notMine(id)
		return nil
	}
	l, err := a.take(ctx, id, from, queueKey(rec))
	if err != nil || l == nil {
		return err
	}
	ev, err := a.store.loadEvent(ctx, id) // again, under the lease
	if err != nil {
		l.release(ctx)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	a.logger.Info("delivering the webhook event of an async batch taken over", zap.String("id", id), zap.String("event", ev.ID))
	a.sendEnd(a.pool, id, l, ev)
	return nil
}

// lookQueue starts, while workers are free, the next jobs waiting: those
// of the cluster's queue and those waiting in this process's memory, in a
// round over their owners. It also counts off the jobs this process
// queued that others have taken, and ends those that expired waiting: on
// a tick, also when no worker is free, as long as jobs this process queued
// may wait (a submission to a busy instance does not list the queue).
func (a *asyncJobs) lookQueue(ctx context.Context, tick bool) {
	p := a.pool
	if !p.hasRoom() && (!tick || !p.queuesIn(a.store)) {
		return
	}
	listed := now()
	keys, err := a.store.List(ctx, queuePrefix, false)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		a.logger.Warn("listing the queue of async batches", zap.Error(err))
		return
	}
	present := make(map[string]bool, len(keys))
	waiting := p.waiting()
	t := now()
	for _, k := range keys {
		q, ok := parseQueued(path.Base(k))
		if !ok {
			continue
		}
		present[q.id] = true
		if !t.Before(q.expires) {
			if !a.foreign(q.id) {
				a.expireQueued(ctx, q)
			}
			continue
		}
		waiting = append(waiting, q)
	}
	p.seen(a.store, present, listed)
	self, identity, serving := a.self()
	r := newRounds(waiting, p.lastServed())
	for ctx.Err() == nil {
		q, ok := r.next()
		if !ok || !p.takeWorker() {
			return
		}
		switch a.startQueued(ctx, q, self, identity, serving) {
		case started:
			p.served(q.owner)
		case passed:
			p.freeWorker()
			r.again()
		default:
			p.freeWorker()
			r.skip(q.owner)
		}
	}
}

// submitterFirst is how long a job just queued is left to the instance it
// was submitted to.
var submitterFirst = time.Second

// startQueued starts q on the worker taken for it. serving says whether
// this handler has been found in the running config (self, identity):
// until then it starts only jobs waiting in memory.
func (a *asyncJobs) startQueued(ctx context.Context, q queued, self endpoint, identity string, serving bool) outcome {
	p := a.pool
	if j := q.job; j != nil {
		switch {
		case !p.takeWaiting(j):
			return passed // canceled meanwhile: it runs already
		case j.leaseLost():
			p.forget(j) // given up: a peer fails it, as it cannot resume
			return passed
		}
		p.startRun(j)
		return started
	}
	switch {
	case p.owesUndelivered(q.id):
		return passed // until a delivery can start
	case !serving || a.foreign(q.id) || p.holds(q.id):
		return waits
	case now().Sub(q.created) < submitterFirst && !p.isQueuedHere(q.id):
		// Its instance starts it if a worker is free there: jobs
		// submitted to each instance at once run one on each, not two
		// on the one that looked first. The owner's next job, maybe
		// submitted here, goes in its place.
		return passed
	}
	spec, err := a.store.loadSpec(ctx, q.id)
	if errors.Is(err, errBadRecord) || errors.Is(err, fs.ErrNotExist) {
		rec, rerr := a.store.loadJob(ctx, q.id)
		switch {
		case errors.Is(rerr, fs.ErrNotExist):
			a.store.deleteKey(ctx, q.key()) // swept, or dropped: nothing is left to run
		case rerr == nil:
			if err := a.failUnreadable(ctx, rec, "", err); err != nil {
				a.logger.Warn("ending an async batch that cannot be read", zap.String("id", q.id), zap.Error(err))
			}
		}
		return passed
	}
	if err != nil {
		a.logger.Warn("loading an async batch queued", zap.String("id", q.id), zap.Error(err))
		return waits
	}
	ep, ok := a.servesJob(spec, self, identity)
	if !ok {
		a.notMine(q.id)
		return waits
	}
	rec := jobRecord{progress: progress{ID: q.id, CreatedAt: q.created}, ExpiresAt: q.expires}
	return a.startTaken(ctx, rec, "", q.key(), spec, ep)
}

// expireQueued ends a job whose window passed in the cluster's queue: it
// runs at once, outside the workers, and skips every operation before it
// is sent; it ends expired, its results readable, and the handler serving
// it tells its webhook.
func (a *asyncJobs) expireQueued(ctx context.Context, q queued) {
	rec, err := a.store.loadJob(ctx, q.id)
	switch {
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, errBadRecord) || err == nil && rec.final():
		a.store.deleteKey(ctx, q.key()) // the sweep deletes the rest
		return
	case err != nil:
		return
	}
	self, identity, ok := a.self()
	if !ok {
		return
	}
	spec, err := a.store.loadSpec(ctx, q.id)
	var ep endpoint
	if err == nil {
		if ep, ok = a.servesJob(spec, self, identity); !ok {
			a.notMine(q.id)
			return
		}
	}
	l, err := a.take(ctx, q.id, "", q.key())
	if err != nil || l == nil {
		return
	}
	if spec == nil {
		a.pool.expire(&job{a: a, lease: l, rec: rec}) // it cannot run: its operations are gone
		return
	}
	if rec, err = a.store.loadJob(ctx, q.id); err != nil || rec.final() {
		l.release(ctx)
		return
	}
	j := &job{a: a, endpoint: spec.Endpoint, spec: spec, lease: l, rec: rec}
	// It sends nothing: what it would have sent with is not needed.
	inherited, _ := a.store.openHeaders(spec, rec.ID)
	j.rn = a.jobRunner(ep, rec.ID, rec.Owner, spec.Conn.facts(spec.Path), inherited)
	a.pool.runNow(j)
}

// sendOwed delivers, under l, the end event that the ended job id
// still owes, if this handler has a webhook; otherwise it lets the job go.
func (a *asyncJobs) sendOwed(ctx context.Context, id string, l *lease) {
	ev, err := a.store.loadEvent(ctx, id)
	if err != nil || a.cfg.Webhook == nil {
		l.release(ctx)
		return
	}
	a.sendEnd(a.pool, id, l, ev)
}

// cancelQueued takes job rec out of the cluster's queue to run it now,
// canceled, through ep: it only skips. It returns the job, nil if it no
// longer waits there (whoever took it finds it canceled).
func (a *asyncJobs) cancelQueued(ctx context.Context, rec jobRecord, ep endpoint) *job {
	spec, err := a.store.loadSpec(ctx, rec.ID)
	if err != nil {
		return nil
	}
	l, err := a.take(ctx, rec.ID, "", queueKey(rec))
	if err != nil || l == nil {
		return nil
	}
	if rec, err = a.store.loadJob(ctx, rec.ID); err != nil || rec.final() {
		l.release(ctx)
		return nil
	}
	j := &job{a: a, endpoint: spec.Endpoint, spec: spec, lease: l, rec: rec}
	j.canceled.Store(true)
	inherited, err := a.store.openHeaders(spec, rec.ID)
	if err != nil {
		// It only skips: what it would have sent with is not needed.
		inherited = nil
	}
	j.rn = a.jobRunner(ep, rec.ID, rec.Owner, spec.Conn.facts(spec.Path), inherited)
	a.pool.runNow(j)
	return j
}
