package batch

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-batch/batch/internal/seal"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// AsyncConfig enables asynchronous batches: a batch sent with
// "Prefer: respond-async" or "async": true is validated, stored and answered
// 202 at once with a job id; its progress and results are read, and the job
// canceled, at <batch path>/<id>. Jobs live in Caddy's storage, so every
// instance sharing it answers for every job.
type AsyncConfig struct {
	// How long a job and its results are kept after it ended (completed,
	// stopped, expired, canceled or error); a job that has not ended is
	// kept until retention after its window would end. Default: 24h.
	Retention caddy.Duration `json:"retention,omitempty"`

	// The completion window: how long after it was submitted a job may
	// run. An operation not started by then never starts; it is skipped
	// (424), as are the rest, operations in flight are cut off (504), and
	// the job ends "expired", its results readable for retention. A job
	// whose window passes while it waits for a worker sends nothing.
	// Default: 24h.
	Window caddy.Duration `json:"window,omitempty"`

	// How many jobs run at once in this process. Jobs beyond that wait:
	// those any instance can run in the cluster's queue in storage, which
	// every instance with a worker free takes from, owners in turn and
	// each owner's jobs in order; the others (see credentials_key) in this
	// process's memory. The pool is shared by all batch handlers of the
	// process and survives config reloads. Default: 4.
	Workers int `json:"workers,omitempty"`

	// How many jobs that this process took may wait for a worker, at
	// least 1: in the cluster's queue, until an instance takes them, or in
	// this process's memory. A batch sent when as many wait is answered
	// 503 with Retry-After, and nothing of it is stored. Like workers, the
	// limit is the process's: the config loaded last sets it. A job in the
	// cluster's queue holds no memory here; one waiting in memory holds
	// the headers its operations inherit, its operations wait in storage.
	// Default: 1000.
	MaxQueued int `json:"max_queued,omitempty"`

	// What identifies the owner of a job: a placeholder evaluated on the
	// submitting request and on every request for the job; only a request
	// that evaluates to the same value may read or cancel it. Only a hash
	// of it is stored. Idempotency keys belong to owners the same way.
	// Default: {http.request.header.Authorization}.
	Owner string `json:"owner,omitempty"`

	// The most operations one async job may hold. A job of more than the
	// handler's max_ops, or with a body over its max_body_size, is
	// streamed into storage as it is read, and its operations must stand
	// alone: no depends_on, references, rollbacks or all_or_nothing.
	// Default: 1000000.
	MaxOps int `json:"max_ops,omitempty"`

	// The largest async job body accepted, in bytes, streamed into
	// storage; larger is answered 413 and nothing of it is kept.
	// Default: 1 GiB.
	MaxBodySize int64 `json:"max_body_size,omitempty"`

	// How long the heartbeat of an instance holding jobs lasts unrenewed:
	// how long after an instance dies another one takes its jobs over. It
	// is renewed every quarter of it, two storage calls however many jobs
	// it holds; instances look for work every tenth of it (from 50ms to
	// 5s). Default: 30s.
	Lease caddy.Duration `json:"lease,omitempty"`

	// The key, 32 bytes in hex or base64 (such as {env.BATCH_KEY}), with
	// which what a job's operations inherit from the request that
	// submitted it (Authorization, Cookie, ...) is stored encrypted
	// (AES-256-GCM), with its operations: any instance can then resume
	// the job. Without it, a job inheriting any header but a few that
	// never carry credentials (Accept, User-Agent, ...) keeps them in the
	// memory of the instance that took it, which alone can run it.
	CredentialsKey string `json:"credentials_key,omitempty"`

	// Keys that jobs may still be encrypted with, after credentials_key
	// has been changed: they decrypt, credentials_key encrypts.
	OldCredentialsKeys []string `json:"old_credentials_keys,omitempty"`

	// The header each operation of a job is sent with, valued
	// "<job id>.<op id>", so that the API can tell an operation sent again
	// after a crash from a new one; an operation's own header wins. "off"
	// sends none. Default: Idempotency-Key.
	OpIdempotencyHeader string `json:"op_idempotency_header,omitempty"`

	// Where to tell that a job has ended (or progressed).
	Webhook *Webhook `json:"webhook,omitempty"`
}

// Defaults of AsyncConfig.
const (
	defaultRetention = 24 * time.Hour
	defaultWindow    = 24 * time.Hour
	defaultWorkers   = 4
	defaultOwner     = "{http.request.header.Authorization}"
	// A queued job holds in memory only what its operations inherit:
	// its operations wait in storage.
	defaultMaxQueued    = 1000
	defaultAsyncMaxOps  = 1_000_000
	defaultAsyncMaxBody = 1 << 30
	defaultLease        = 30 * time.Second
)

// asyncJobs is everything asynchronous of a handler: it takes jobs at
// submit, answers the job paths, and runs, hands over, takes over, sweeps
// and reports jobs through the process's pool. The handler calls it at
// those two places only; a job's runner sees the job through jobControl.
type asyncJobs struct {
	cfg     *AsyncConfig // defaults filled in
	h       *Handler     // whose rules, formats and chain jobs run with
	store   *store
	pool    *jobPool
	logger  *zap.Logger
	metrics *metrics
	// opKey is the header that carries each job operation's idempotency
	// key; "" for none.
	opKey string
	// selfEP is where the handler is in the running config, found once
	// it runs; identity names that place and the handler's config.
	selfMu   sync.Mutex
	selfEP   endpoint
	identity string
	// hold is what this handler holds in storage: the jobs it runs, and
	// those that wait here because only this process can run them.
	hold hold
	// stop ends the look for work; woken wakes it.
	stop  context.CancelFunc
	woken chan struct{}
	// foreignIDs are jobs found to run through other handlers, as of the
	// pool's endpoints at foreignGen.
	foreignMu  sync.Mutex
	foreignIDs map[string]bool
	foreignGen int
	// migrated is set once no job of an older version is left listed as
	// active (adopt.go).
	migrated atomic.Bool
}

// newAsyncJobs sets up the async jobs of h from its AsyncConfig.
func newAsyncJobs(ctx caddy.Context, h *Handler) (*asyncJobs, error) {
	cfg := h.Async
	if err := cfg.provision(); err != nil {
		return nil, err
	}
	if h.storage == nil {
		return nil, errors.New("async batches need Caddy's storage, and this context has none")
	}
	a := &asyncJobs{cfg: cfg, h: h, store: h.storage, logger: h.logger, metrics: h.metrics, woken: make(chan struct{}, 1)}
	a.hold.a = a
	h.owners.placeholder = cfg.Owner
	switch cfg.OpIdempotencyHeader {
	case "":
		a.opKey = "Idempotency-Key"
	case "off":
	default:
		a.opKey = http.CanonicalHeaderKey(cfg.OpIdempotencyHeader)
	}
	if cfg.CredentialsKey != "" {
		repl := caddy.NewReplacer()
		keys := []string{repl.ReplaceKnown(cfg.CredentialsKey, "")}
		for _, k := range cfg.OldCredentialsKeys {
			keys = append(keys, repl.ReplaceKnown(k, ""))
		}
		var err error
		if a.store.sealer, err = seal.New(keys); err != nil {
			return nil, fmt.Errorf("credentials_key: %w", err)
		}
	}
	val, _, err := pools.LoadOrNew(poolKey, func() (caddy.Destructor, error) { return newJobPool(), nil })
	if err != nil {
		return nil, err
	}
	a.pool = val.(*jobPool)
	a.pool.setLimits(cfg.Workers, cfg.MaxQueued)
	var adoptCtx context.Context
	adoptCtx, a.stop = context.WithCancel(ctx)
	a.pool.wake(a, a.woken)
	go a.adoptJobs(adoptCtx)
	return a, nil
}

// release lets go of this config's hold on the pool: running jobs go on
// as long as a config holds it.
func (a *asyncJobs) release() error {
	a.stop()
	a.pool.sleep(a)
	_, err := pools.Delete(poolKey)
	return err
}

// provision fills in the defaults and checks the config.
func (cfg *AsyncConfig) provision() error {
	if cfg.Retention == 0 {
		cfg.Retention = caddy.Duration(defaultRetention)
	}
	if cfg.Window == 0 {
		cfg.Window = caddy.Duration(defaultWindow)
	}
	if cfg.Workers == 0 {
		cfg.Workers = defaultWorkers
	}
	if cfg.Owner == "" {
		cfg.Owner = defaultOwner
	}
	if cfg.MaxQueued == 0 {
		cfg.MaxQueued = defaultMaxQueued
	}
	if cfg.MaxOps == 0 {
		cfg.MaxOps = defaultAsyncMaxOps
	}
	if cfg.MaxBodySize == 0 {
		cfg.MaxBodySize = defaultAsyncMaxBody
	}
	if cfg.Lease == 0 {
		cfg.Lease = caddy.Duration(defaultLease)
	}
	switch {
	case cfg.Retention < caddy.Duration(time.Second) || cfg.Window < caddy.Duration(time.Second) || cfg.Workers < 0:
		return errors.New("retention and window must be at least 1s, and workers positive")
	case cfg.MaxQueued < 0 || cfg.MaxOps < 0 || cfg.MaxBodySize < 0:
		return errors.New("max_queued, max_ops and max_body_size must be positive")
	case cfg.Lease < caddy.Duration(100*time.Millisecond):
		return fmt.Errorf("lease must be at least 100ms, got %s", time.Duration(cfg.Lease))
	case cfg.CredentialsKey == "" && len(cfg.OldCredentialsKeys) > 0:
		return errors.New("old_credentials_keys needs credentials_key")
	}
	if cfg.Webhook != nil {
		return cfg.Webhook.provision()
	}
	return nil
}

// Job states.
const (
	stateQueued    = "queued"
	stateRunning   = "running"
	stateCompleted = "completed"
	stateError     = "error"
	stateCanceled  = "canceled"
	// stateStopped: the failure budget stopped it (SPEC §13).
	stateStopped = "stopped"
	// stateExpired: its completion window passed before it ended.
	stateExpired = "expired"
)

// wantsAsync reports whether the client asked for an async answer with
// "Prefer: respond-async".
func wantsAsync(r *http.Request) bool {
	for _, v := range r.Header.Values("Prefer") {
		for _, p := range splitComma(v) {
			if strings.EqualFold(p, "respond-async") {
				return true
			}
		}
	}
	return false
}

// writeRefusal answers a job the pool would not take (503); other errors
// it returns. It runs outside submit so that an Idempotency-Key does not
// keep the refusal as its answer.
func writeRefusal(w http.ResponseWriter, b *batch, err error) error {
	if errors.Is(err, errQueueFull) || errors.Is(err, errPoolClosed) {
		w.Header().Set("Retry-After", strconv.Itoa(queueRetryAfter))
		return b.format.refuse(w, http.StatusServiceUnavailable, err.Error(), nil)
	}
	return err
}

// submit stores a validated batch taken whole as a job, queues it and
// answers 202. When the queue is full it returns errQueueFull, for
// writeRefusal.
func (a *asyncJobs) submit(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, b *batch, body []byte) error {
	if a.store.sealer == nil {
		if faults := storedCredentials(b); len(faults) > 0 {
			return b.format.refuse(w, http.StatusBadRequest, "invalid batch", faults)
		}
	}
	j, err := a.newJob(w, r, next, b.format)
	if j == nil {
		return err
	}
	j.rec.Metadata = b.metadata
	if err := a.pool.reserve(); err != nil {
		return err // nothing is stored yet
	}
	j.reserved = true
	j.spec.Shape, j.spec.Starts = shapeBody, []int{0}
	if err := a.store.storeChunk(r.Context(), j.spec, j.rec.ID, 0, body); err != nil {
		return j.drop(caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("storing async batch: %w", err)))
	}
	return a.queueJob(w, r, j, len(b.ops))
}

// newJob returns a job of the batch request r, whose operations are to be
// stored next; nil when the request was answered (or err says why not).
func (a *asyncJobs) newJob(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, f format) (*job, error) {
	who, err := a.h.owners.of(r)
	if err != nil {
		return nil, a.h.owners.refuse(w, f, err)
	}
	srv, err := serverOf(r)
	if err != nil {
		return nil, err
	}
	key := endpointKey(srv, r, strings.TrimSuffix(r.URL.Path, "/"))
	ep := endpoint{h: a.h, next: next, srv: srv}
	a.pool.serveAt(key, ep)
	id := newBatchID()
	conn := connFactsOf(r)
	spec := &jobSpec{ContentType: r.Header.Get("Content-Type"), Path: r.URL.Path, Conn: storeConn(conn),
		Endpoint: key, SealedOps: a.store.sealer != nil}
	_, spec.Handler, _ = a.self()
	rec := jobRecord{progress: progress{ID: id, Status: stateQueued, CreatedAt: now()}, Owner: who.hash}
	windowEnd := rec.CreatedAt.Add(time.Duration(a.cfg.Window))
	rec.WindowEndsAt = &windowEnd
	rec.ExpiresAt = windowEnd.Add(time.Duration(a.cfg.Retention)) // until it ends
	if of, ok := r.Context().Value(rerunKey{}).(string); ok {
		spec.RetryOf, rec.RetryOf = of, of
	}
	if f != native {
		rec.Format = f.name()
	}
	return &job{a: a, endpoint: key, spec: spec, rec: rec, rn: a.jobRunner(ep, id, who.hash, conn, inheritedHeaders(r.Header, a.h.inherit))}, nil
}

// drop gives up a job that was not queued: its place, and what it stored.
func (j *job) drop(err error) error {
	a, id := j.a, j.rec.ID
	if j.reserved {
		a.pool.unreserve()
	}
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	if j.lease != nil {
		j.lease.release(ctx)
	}
	if err := deleteTree(ctx, a.store, jobKey(id)); err != nil {
		a.logger.Warn("deleting refused batch job", zap.String("id", id), zap.Error(err))
	}
	a.store.unindexJob(ctx, &j.rec)
	return err
}

// queueJob stores a job of n operations, which are stored, queues it and
// answers 202. A job any instance can run waits in the cluster's queue;
// one whose credentials are kept in memory waits in this process's, held
// by it.
func (a *asyncJobs) queueJob(w http.ResponseWriter, r *http.Request, j *job, n int) error {
	id, spec := j.rec.ID, j.spec
	if !j.reserved {
		// A streamed job holds its place only once it is read whole: an
		// upload that takes its time holds no one else's.
		if err := a.pool.reserve(); err != nil {
			return j.drop(err)
		}
		j.reserved = true
	}
	ctx := context.WithoutCancel(r.Context())
	j.rec.Total = n
	err := a.store.keepHeaders(spec, id, j.rn.inherited)
	if err == nil {
		err = a.store.storeSpec(ctx, id, spec)
	}
	if err == nil {
		// Listed before its record is stored: a job is never without
		// its entry in its owner's index.
		err = a.store.indexJob(ctx, &j.rec)
	}
	if err == nil {
		err = j.save(ctx)
	}
	// Listed only once it is stored whole: whoever finds it can run it.
	queuedAt := now()
	switch {
	case err == nil && j.resumable():
		err = a.store.enqueue(ctx, j.rec)
	case err == nil:
		j.lease, err = a.hold.add(ctx, id)
	}
	if err != nil {
		return j.drop(caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("storing async batch: %w", err)))
	}
	queued := j.snapshot().progress
	if j.resumable() {
		// Whichever instance takes it runs it: even should this one be
		// shutting down, it is queued.
		a.pool.submitted(id, a.store, queuedAt)
	} else if err := a.pool.submit(j); err != nil {
		// The pool ended while the job was stored: nothing would run it.
		return j.drop(err)
	}
	j.reserved = false
	a.metrics.jobs.WithLabelValues(stateQueued).Inc()
	a.logger.Info("async batch queued", zap.String("id", id), zap.Int("operations", n), zap.Bool("resumable", j.resumable()))

	w.Header().Set("Location", strings.TrimSuffix(r.URL.Path, "/")+"/"+id)
	if wantsAsync(r) {
		w.Header().Set("Preference-Applied", "respond-async")
	}
	return writeProgress(w, http.StatusAccepted, queued)
}

// jobRunner returns the runner of a job, which runs through ep; its
// operations are loaded as it runs.
func (a *asyncJobs) jobRunner(ep endpoint, id, owner string, conn connFacts, inherited http.Header) *runner {
	rn := &runner{h: ep.h, id: id, next: ep.next, srv: ep.srv, conn: conn, base: context.Background(),
		timeout: time.Duration(a.cfg.Window), inherited: inherited, stoppedAt: -1, opKey: ep.h.jobs.opKey, caller: owner}
	rn.refs.reset(ep.h.MaxReferenceSize)
	rn.logs = rn.accessLoggers()
	return rn
}
