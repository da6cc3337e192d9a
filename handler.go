// Package batch is a Caddy HTTP handler that gives any API behind Caddy batch
// requests: a client POSTs many operations in one call, each runs as a
// sub-request through the handlers after batch, and the answers come back
// merged, in order, in one response.
package batch

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/caddy-batch/batch/internal/pace"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/encode"
	_ "github.com/caddyserver/caddy/v2/modules/caddyhttp/encode/gzip" // the default encodings
	_ "github.com/caddyserver/caddy/v2/modules/caddyhttp/encode/zstd"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/tidwall/gjson"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// Handler answers batch requests. Each operation of a batch becomes a
// sub-request that the rest of the handler chain serves exactly as if it had
// been sent alone; the answers are merged, in request order, into one
// response.
type Handler struct {
	// How operations run unless a batch says otherwise: "sequential" (in
	// array order, one at a time) or "parallel" (up to concurrency at once,
	// respecting depends_on). Default: sequential.
	Mode string `json:"mode,omitempty"`

	// How many operations of a parallel batch run at once. Default: 10.
	Concurrency int `json:"concurrency,omitempty"`

	// How many operations with the same "key" run at once, in parallel
	// batches and jobs; they start in the order they were submitted, and
	// operations without a key are not held back. A batch may set its own
	// with the batch field "key_concurrency". Default: 1.
	KeyConcurrency int `json:"key_concurrency,omitempty"`

	// What one failed operation does to the rest unless a batch says
	// otherwise: "none" (each stands alone), "stop_on_error" (later ones
	// are skipped) or "all_or_nothing" (later ones are skipped and earlier
	// ones rolled back). The last two always run sequentially. Default: none.
	Atomicity string `json:"atomicity,omitempty"`

	// The most operations one batch may hold; more is answered 413.
	// Default: 100.
	MaxOps int `json:"max_ops,omitempty"`

	// The largest batch body accepted, in bytes; larger is answered 413.
	// Default: 10 MiB.
	MaxBodySize int64 `json:"max_body_size,omitempty"`

	// The largest answer kept from one operation, in bytes; a larger one
	// becomes that operation's 502. Default: 10 MiB.
	MaxResponseSize int64 `json:"max_response_size,omitempty"`

	// The most bytes that filling in references ({{id.body}} …) may add to
	// the operations of one batch, all together, rollbacks included: a
	// small batch must not make huge requests. An operation whose
	// references would go past it is not run (424). Default: max_body_size.
	MaxReferenceSize int64 `json:"max_reference_size,omitempty"`

	// How long a whole batch may run; operations not finished by then are
	// answered 504. Default: 60s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// How long one operation may run before it is canceled and answered
	// 504. Default: 30s.
	OpTimeout caddy.Duration `json:"op_timeout,omitempty"`

	// HTTP methods operations may use. Default: GET HEAD POST PUT PATCH DELETE.
	Methods []string `json:"methods,omitempty"`

	// Paths operations may target, in the syntax of the path matcher
	// (exact, prefix "/api/*", suffix, or "*" wildcards; case-insensitive).
	// An operation outside them fails validation. Default: any path.
	Paths []string `json:"paths,omitempty"`

	// Headers of the batch request that each operation inherits. Default:
	// all of them but hop-by-hop headers, Content-*, Accept-Encoding, Expect
	// and Prefer.
	InheritHeaders []string `json:"inherit_headers,omitempty"`

	// X-Forwarded-*, Forwarded and X-Real-IP headers an operation may set;
	// any other such header an operation gives is dropped, so that a batch
	// cannot speak for another client address. Default: none.
	AllowForwardedHeaders []string `json:"allow_forwarded_headers,omitempty"`

	// Which answers an operation is sent again after, how often, and
	// after what wait. Default: none for sync batches; 429 and 503, 5
	// tries in all, for async jobs.
	Retry *RetryConfig `json:"retry,omitempty"`

	// An alias of retry: how many times an operation with an idempotent
	// method (GET, HEAD, PUT, DELETE, OPTIONS) or an idempotency key
	// answered 429 is tried again, after the wait its Retry-After asks
	// for, as long as op_timeout allows. Not with retry. Default: 0.
	Retry429 int `json:"retry_429,omitempty"`

	// The failure budget of a batch or job: once this many of its
	// operations have failed (run and answered 400 or more, or an
	// error), no further operation starts, and the rest are skipped (424,
	// "failure budget exhausted"); operations in flight finish. Reaching
	// it stops: with 50, the 50th failure stops. A batch's field
	// max_failures overrides it. The failure of an operation that
	// another's "if" tests does not count. Default: 0, none.
	MaxFailures int `json:"max_failures,omitempty"`

	// The failure budget as a share: once the failed operations are at
	// least this fraction (0.05 for 5%) of the operations run, counted
	// from failure_rate_sample operations run on, no further operation
	// starts, as for max_failures. A batch's field max_failure_rate
	// overrides it. Default: 0, none.
	MaxFailureRate float64 `json:"max_failure_rate,omitempty"`

	// How many operations must have run before max_failure_rate counts.
	// Default: 100.
	FailureRateSample int `json:"failure_rate_sample,omitempty"`

	// The most operations in flight downstream at once, across all
	// batches and async jobs of this handler; more wait for a turn (within
	// their op_timeout, then 504), taken round-robin between batches so
	// that a large job does not starve a small batch. The budget belongs to
	// this handler instance: a reloaded config starts a new one. Must not
	// be negative; 0 means the default. Default: 32.
	MaxInflight int `json:"max_inflight,omitempty"`

	// A rate operations wait for (within their op_timeout), for all
	// batches and jobs of this handler, or per key. Default: none.
	Rate *RateConfig `json:"rate,omitempty"`

	// How the operations of sync batches react to the API's rate limits:
	// "adaptive" shares one pacer between all adaptive operations of the
	// handler: a first 429 pauses them for its Retry-After (1s if none,
	// at most 60s), then they start at a rate learned from the API's
	// answers, lowered on each later 429 and grown back as answers
	// succeed (a Retry-After over 1s pauses them all again); the quota
	// left that RateLimit and X-RateLimit headers advertise is spread
	// over their reset; operations answered 429, of any method, are sent
	// again at their turn until op_timeout (retry's other statuses apply
	// as without pacing).
	// "off" does none of it. Async jobs are always adaptive. Default: off.
	Pacing string `json:"pacing,omitempty"`

	// The largest answer kept, in bytes, for a batch sent with an
	// Idempotency-Key. The answer is held in memory up to this size and
	// stored before it is sent; a larger one is sent as it comes, with
	// "Idempotent-Stored: false", and nothing is stored: the same key runs
	// the batch again. Must be positive. Default: 1 MiB.
	MaxIdempotentSize int64 `json:"max_idempotent_size,omitempty"`

	// The path that the absolute urls of JSON batch (Graph, OData) and
	// multipart requests are under: "/me" sent to /v1.0/$batch is /v1.0/me,
	// as Graph has it; a url already under it is left as it is, as OData
	// has it. "/" leaves every absolute path as it is. Relative urls
	// resolve against the batch URL. Default: the directory of the batch
	// path ("" at /batch or /$batch).
	ServiceRoot string `json:"service_root,omitempty"`

	// Encodings the batch answer may be compressed in, in order of
	// preference, as the batch request's Accept-Encoding allows: modules
	// of Caddy's encode handler (http.encoders.*, such as zstd and gzip).
	// "off" alone sends answers as they are. The site's encode directive
	// does not reach the batch answer: batch is ordered before it, and
	// operations never inherit Accept-Encoding. Default: zstd gzip.
	Encode []string `json:"encode,omitempty"`

	// Leave operations out of the access log. By default, when the site
	// logs (the log directive), each operation gets the entry a lone
	// request would, with "batch": {id, op_id, index}, and the batch
	// request's own entry gets "batch": {id, operations, succeeded, failed,
	// skipped}.
	SkipOperationLogs bool `json:"skip_operation_logs,omitempty"`

	// Enables asynchronous batches. Default: off.
	Async *AsyncConfig `json:"async,omitempty"`

	rules   rules
	retry   retryPolicy
	enc     *encode.Encode // compresses answers; nil when off
	paths   caddyhttp.MatchPath
	inherit []string // canonical; nil inherits all but the excluded ones
	ctx     caddy.Context
	logger  *zap.Logger
	// accessLog is where operations are logged, as the server logs lone
	// requests.
	accessLog *zap.Logger
	owners    *owners // who owns a job or an idempotency key
	keyLocks  *keyLocks
	metrics   *metrics
	// gate orders the operations sent downstream: max_inflight, rate
	// and pacing.
	gate *pace.Gate
	// errorChains holds the error routes of each server, compiled.
	errorChains sync.Map
	// storage holds async jobs and idempotent answers: Caddy's, nil in a
	// context without a config (unit tests).
	storage *store
	// jobs runs async batches; nil when they are off.
	jobs *asyncJobs
	// stopSweeping ends the sweeps of what storage holds; stopPacing the
	// sharing of what the pacers learned.
	stopSweeping func()
	stopPacing   context.CancelFunc
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.batch",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Defaults.
const (
	defaultConcurrency = 10
	defaultMaxOps      = 100
	defaultMaxSize     = 10 << 20
	defaultTimeout     = 60 * time.Second
	defaultOpTimeout   = 30 * time.Second
	defaultMaxInflight = 32
)

var defaultMethods = []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"}

// Provision sets up the handler and fills in defaults.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	// Requests are logged as the HTTP app's "log.access", then the name
	// the log directive gave the site: the custom logs that take them are
	// chosen by the app's name.
	h.accessLog = ctx.Logger(new(caddyhttp.App)).Named("log.access")
	if h.Mode == "" {
		h.Mode = modeSequential
	}
	if h.Atomicity == "" {
		h.Atomicity = atomicNone
	}
	if h.Concurrency == 0 {
		h.Concurrency = defaultConcurrency
	}
	if h.KeyConcurrency == 0 {
		h.KeyConcurrency = 1
	}
	if h.MaxOps == 0 {
		h.MaxOps = defaultMaxOps
	}
	if h.MaxBodySize == 0 {
		h.MaxBodySize = defaultMaxSize
	}
	if h.MaxResponseSize == 0 {
		h.MaxResponseSize = defaultMaxSize
	}
	if h.MaxReferenceSize == 0 {
		h.MaxReferenceSize = h.MaxBodySize
	}
	if h.Timeout == 0 {
		h.Timeout = caddy.Duration(defaultTimeout)
	}
	if h.OpTimeout == 0 {
		h.OpTimeout = caddy.Duration(defaultOpTimeout)
	}
	if h.MaxIdempotentSize == 0 {
		h.MaxIdempotentSize = defaultMaxIdempotentSize
	}
	if h.MaxInflight == 0 {
		h.MaxInflight = defaultMaxInflight
	}
	if h.Pacing == "" {
		h.Pacing = pacingOff
	}
	h.gate = pace.NewGate(h.MaxInflight, h.Rate.paceRate())
	h.retry = h.retryPolicy()
	methods := h.Methods
	if len(methods) == 0 {
		methods = defaultMethods
	}
	h.rules = rules{
		mode:        h.Mode,
		atomicity:   h.Atomicity,
		maxOps:      h.MaxOps,
		methods:     make(map[string]struct{}, len(methods)),
		forwarded:   make(map[string]struct{}, len(h.AllowForwardedHeaders)),
		serviceRoot: h.ServiceRoot,
		maxRefSize:  h.MaxReferenceSize,
	}
	for _, m := range methods {
		h.rules.methods[strings.ToUpper(m)] = struct{}{}
	}
	for _, name := range h.AllowForwardedHeaders {
		h.rules.forwarded[http.CanonicalHeaderKey(name)] = struct{}{}
	}
	if len(h.Paths) > 0 {
		h.paths = append(caddyhttp.MatchPath(nil), h.Paths...)
		if err := h.paths.Provision(ctx); err != nil {
			return fmt.Errorf("provisioning paths: %w", err)
		}
		h.rules.pathAllow = h.pathAllowed
	}
	for _, name := range h.InheritHeaders {
		h.inherit = append(h.inherit, http.CanonicalHeaderKey(name))
	}
	h.ctx = ctx
	h.owners = &owners{placeholder: defaultOwner}
	h.keyLocks = new(keyLocks)
	if err := h.provisionEncode(ctx); err != nil {
		return fmt.Errorf("encode: %w", err)
	}
	var reg prometheus.Registerer
	if r := ctx.GetMetricsRegistry(); r != nil {
		reg = r
	}
	var err error
	if h.metrics, err = newMetrics(reg); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	if s := storageOf(ctx); s != nil {
		h.storage = &store{Storage: s, logger: h.logger}
		h.owners.store = h.storage
	}
	if h.Async != nil {
		if h.jobs, err = newAsyncJobs(ctx, h); err != nil {
			return fmt.Errorf("async: %w", err)
		}
	}
	// Idempotent answers are kept with or without async.
	h.startSweeping(ctx)
	if h.storage != nil && (h.Async != nil || h.Pacing == pacingAdaptive) {
		var paceCtx context.Context
		paceCtx, h.stopPacing = context.WithCancel(ctx)
		go h.sharePacing(paceCtx)
	}
	return nil
}

// defaultEncodings compress batch answers unless the config says otherwise.
var defaultEncodings = []string{"zstd", "gzip"}

// provisionEncode sets up Caddy's own encode handler for the answers, on
// the content types of every format.
func (h *Handler) provisionEncode(ctx caddy.Context) error {
	names := h.Encode
	if len(names) == 0 {
		names = defaultEncodings
	}
	if len(names) == 1 && names[0] == "off" {
		return nil
	}
	mods := caddy.ModuleMap{}
	for _, name := range names {
		if name == "off" {
			return errors.New(`"off" stands alone`)
		}
		mods[name] = json.RawMessage("{}")
	}
	h.enc = &encode.Encode{
		EncodingsRaw: mods,
		Prefer:       names,
		Matcher: &caddyhttp.ResponseMatcher{Headers: http.Header{"Content-Type": {
			"application/json*", "application/x-ndjson*", "multipart/mixed*"}}},
	}
	return h.enc.Provision(ctx)
}

// Cleanup stops the sweep of idempotent answers and releases this config's
// hold on the async job pool; running jobs go on as long as a config holds
// it.
func (h *Handler) Cleanup() error {
	if h.stopSweeping != nil {
		h.stopSweeping()
	}
	if h.stopPacing != nil {
		h.stopPacing()
	}
	if h.jobs != nil {
		return h.jobs.release()
	}
	return nil
}

// Validate checks the configuration.
func (h *Handler) Validate() error {
	switch h.Mode {
	case modeSequential, modeParallel:
	default:
		return fmt.Errorf("mode must be %q or %q, got %q", modeSequential, modeParallel, h.Mode)
	}
	switch h.Atomicity {
	case atomicNone, atomicStopOnError, atomicAllOrNothing:
	default:
		return fmt.Errorf("atomicity must be %q, %q or %q, got %q", atomicNone, atomicStopOnError, atomicAllOrNothing, h.Atomicity)
	}
	switch {
	case h.Concurrency < 1:
		return fmt.Errorf("concurrency must be at least 1, got %d", h.Concurrency)
	case h.KeyConcurrency < 1:
		return fmt.Errorf("key_concurrency must be at least 1, got %d", h.KeyConcurrency)
	case h.MaxOps < 1:
		return fmt.Errorf("max_ops must be at least 1, got %d", h.MaxOps)
	case h.MaxBodySize < 1:
		return fmt.Errorf("max_body_size must be positive, got %d", h.MaxBodySize)
	case h.MaxResponseSize < 1:
		return fmt.Errorf("max_response_size must be positive, got %d", h.MaxResponseSize)
	case h.MaxReferenceSize < 1:
		return fmt.Errorf("max_reference_size must be positive, got %d", h.MaxReferenceSize)
	case h.MaxIdempotentSize < 1:
		return fmt.Errorf("max_idempotent_size must be positive, got %d", h.MaxIdempotentSize)
	case h.Timeout < 0 || h.OpTimeout < 0:
		return errors.New("timeout and op_timeout must be positive")
	case h.Retry429 < 0:
		return fmt.Errorf("retry_429 must not be negative, got %d", h.Retry429)
	case h.MaxInflight < 0:
		return fmt.Errorf("max_inflight must not be negative, got %d", h.MaxInflight)
	case h.MaxFailures < 0 || h.FailureRateSample < 0:
		return errors.New("max_failures and failure_rate_sample must not be negative")
	case !(h.MaxFailureRate >= 0 && h.MaxFailureRate <= 1):
		return fmt.Errorf("max_failure_rate must be a fraction from 0 to 1, got %v", h.MaxFailureRate)
	case h.Pacing != pacingAdaptive && h.Pacing != pacingOff:
		return fmt.Errorf("pacing must be %q or %q, got %q", pacingAdaptive, pacingOff, h.Pacing)
	}
	if h.Rate != nil {
		if err := h.Rate.validate(); err != nil {
			return err
		}
	}
	if h.Retry != nil {
		if err := h.Retry.validate(h.Retry429); err != nil {
			return err
		}
	}
	for m := range h.rules.methods {
		if m == "" || strings.ContainsAny(m, " \t\r\n") {
			return fmt.Errorf("invalid method %q", m)
		}
	}
	if r := h.ServiceRoot; r != "" && (r[0] != '/' || strings.ContainsAny(r, "?#") || strings.Contains(r, "//")) {
		return fmt.Errorf("service_root must be a path that starts with '/', got %q", r)
	}
	for _, name := range h.AllowForwardedHeaders {
		if !isForwardedHeader(http.CanonicalHeaderKey(name)) {
			return fmt.Errorf("allow_forwarded_headers: %q is not an X-Forwarded-*, Forwarded or X-Real-IP header", name)
		}
	}
	return nil
}

// ServeHTTP answers a batch request; other requests it refuses.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if r.Context().Value(batchCtxKey) != nil {
		// Reached from one of our own sub-requests: that operation fails.
		return caddyhttp.Error(http.StatusBadRequest, errNestedBatch)
	}
	if h.enc != nil {
		return h.enc.ServeHTTP(w, r, caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			return h.serveBatch(w, r, next)
		}))
	}
	return h.serveBatch(w, r, next)
}

// serveBatch answers a batch request, or a request for a job.
func (h *Handler) serveBatch(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if h.Async != nil {
		if id, sub, ok := jobPath(r.URL.Path); ok {
			return h.jobs.serve(w, r, next, id, sub)
		}
		if r.Method == http.MethodGet {
			return h.jobs.list(w, r)
		}
	}
	if r.Method != http.MethodPost {
		if h.Async != nil {
			w.Header().Set("Allow", "GET, POST")
			return writeError(w, http.StatusMethodNotAllowed, "batch requests must be POST; GET lists your jobs")
		}
		w.Header().Set("Allow", http.MethodPost)
		return writeError(w, http.StatusMethodNotAllowed, "batch requests must be POST")
	}
	ct := r.Header.Get("Content-Type")
	if isNDJSON(ct) {
		if h.jobs == nil {
			return writeError(w, http.StatusBadRequest, "an NDJSON batch is an async job, and async batches are not enabled here")
		}
		return h.jobs.submitStreamed(w, r, next, nil, r.Body, streamNDJSON)
	}
	if isCSV(ct) {
		return h.serveCSV(w, r, next)
	}
	if formatOf(ct, nil) == nil {
		return writeError(w, http.StatusUnsupportedMediaType, "batch must be sent with Content-Type: application/json, application/x-ndjson (async), text/csv, or multipart/mixed with a boundary")
	}
	// An async batch over max_body_size is streamed into storage.
	streamable := h.Async != nil && wantsAsync(r) && isJSONType(ct)
	body, rest, status, msg := h.readBody(w, r, streamable)
	if status != 0 {
		return writeError(w, status, msg)
	}
	f := formatOf(ct, body)
	if rest != nil {
		if f != native {
			return f.refuse(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("batch body is larger than %d bytes (only native batches are streamed)", h.MaxBodySize), nil)
		}
		return h.jobs.submitStreamed(w, r, next, body, rest, streamJSON)
	}
	b, err := f.decode(r, body, &h.rules)
	if err != nil {
		var tooMany tooManyOpsError
		if errors.As(err, &tooMany) && f == native && h.Async != nil && (wantsAsync(r) || gjson.GetBytes(body, "async").Bool()) {
			return h.jobs.submitStreamed(w, r, next, body, http.NoBody, streamJSON)
		}
		return refuseDecoded(w, r, f, err)
	}
	b.format = f
	b.async = b.async || h.Async != nil && wantsAsync(r)
	return h.route(w, r, next, b, body)
}

// refuseDecoded answers a batch that did not decode: 400 with its faults,
// or 413.
func refuseDecoded(w http.ResponseWriter, r *http.Request, f format, err error) error {
	var faults badBatchError
	switch {
	case errors.As(err, &faults):
		return f.refuse(w, http.StatusBadRequest, "invalid batch", faults)
	case r.Context().Err() != nil:
		return nil // the client is gone: nobody reads an answer
	}
	return f.refuse(w, http.StatusRequestEntityTooLarge, err.Error(), nil)
}

// serveCSV answers a text/csv batch: a bulk batch of its rows, whose
// operation the query gives. An async one is streamed into storage as
// NDJSON is; a sync one is read whole, at most max_body_size and max_ops
// rows.
func (h *Handler) serveCSV(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	q := r.URL.Query()
	if wantsAsync(r) || q.Get("async") == "true" {
		if h.jobs == nil {
			return writeError(w, http.StatusBadRequest, "async batches are not enabled here")
		}
		return h.jobs.submitStreamed(w, r, next, nil, r.Body, streamCSV)
	}
	body, _, status, msg := h.readBody(w, r, false)
	if status != 0 {
		return writeError(w, status, msg)
	}
	bulk, lines, err := csvBatch(bytes.NewReader(body), q, &h.rules, h.MaxBodySize)
	var b *batch
	if err == nil {
		b, err = parseBatch(r.Context(), bulk, &h.rules)
		err = atLines(err, lines)
	}
	if err != nil {
		return refuseDecoded(w, r, native, err)
	}
	b.format = native
	return h.route(w, r, next, b, body)
}

// readBody reads a batch body of at most max_body_size; a status and a
// message say why it could not be. When the body may be streamed and is
// larger, what was read comes back with the rest to read.
func (h *Handler) readBody(w http.ResponseWriter, r *http.Request, streamable bool) (body []byte, rest io.Reader, status int, msg string) {
	tooBig := fmt.Sprintf("batch body is larger than %d bytes", h.MaxBodySize)
	switch {
	case streamable && r.ContentLength > h.MaxBodySize:
		// Only enough to tell the format is read before streaming.
		head := make([]byte, 512)
		n, err := io.ReadFull(r.Body, head)
		if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, nil, http.StatusBadRequest, "reading the batch body: " + err.Error()
		}
		return head[:n], r.Body, 0, ""
	case r.ContentLength > h.MaxBodySize:
		return nil, nil, http.StatusRequestEntityTooLarge, tooBig
	}
	var err error
	if streamable {
		if body, err = io.ReadAll(io.LimitReader(r.Body, h.MaxBodySize+1)); err == nil && int64(len(body)) > h.MaxBodySize {
			return body, r.Body, 0, ""
		}
	} else {
		body, err = io.ReadAll(http.MaxBytesReader(w, r.Body, h.MaxBodySize))
	}
	if err != nil {
		var maxErr *http.MaxBytesError
		var netErr net.Error
		switch {
		case errors.As(err, &maxErr):
			return nil, nil, http.StatusRequestEntityTooLarge, tooBig
		case errors.As(err, &netErr) && netErr.Timeout():
			// The server's read timeouts cut off a body that never ends.
			return nil, nil, http.StatusRequestTimeout, "timed out reading the batch body"
		}
		return nil, nil, http.StatusBadRequest, "reading the batch body: " + err.Error()
	}
	return body, nil, 0, ""
}

// route decides how a valid batch is answered: a dry run, once per
// Idempotency-Key (which wraps the rest), as an async job, or at once.
func (h *Handler) route(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, b *batch, body []byte) error {
	switch key := r.Header.Get("Idempotency-Key"); {
	case b.dryRun:
		return writeDryRun(w, b, inheritedHeaders(r.Header, h.inherit))
	case b.async && h.Async == nil:
		return b.format.refuse(w, http.StatusBadRequest, "invalid batch", badBatchError{{Index: -1, Message: "async batches are not enabled here"}})
	case key != "":
		return writeRefusal(w, b, h.serveIdempotent(w, r, next, b, key, body))
	case b.async:
		return writeRefusal(w, b, h.jobs.submit(w, r, next, b, body))
	}
	_, err := h.run(w, r, next, b)
	return err
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)

// run runs a batch for the client and answers it.
func (h *Handler) run(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, b *batch) (summary, error) {
	ctx, cancel := context.WithTimeout(r.Context(), time.Duration(h.Timeout))
	defer cancel()
	rn, err := newRunner(h, ctx, r, next, b)
	if err != nil {
		return summary{}, err
	}
	sum := rn.execute(b.format.sink(w, r, b))
	setLogFields(r, rn.id, sum)
	return sum, nil
}

// pathAllowed matches an operation's path against the configured paths.
func (h *Handler) pathAllowed(u *url.URL) bool {
	// MatchPath reads the replacer for patterns with placeholders; an empty
	// one leaves them blank, so such patterns match no client-chosen path.
	r := &http.Request{URL: u}
	r = r.WithContext(context.WithValue(context.Background(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
	ok, err := h.paths.MatchWithError(r)
	return ok && err == nil
}

// now is the clock; tests may move it.
var now = time.Now

// Values of the pacing option.
const (
	pacingAdaptive = "adaptive"
	pacingOff      = "off"
)

// RateConfig is a rate that operations wait for: a token bucket of
// requests tokens, refilled at requests per interval.
type RateConfig struct {
	// How many operations may start per interval; also the burst allowed
	// after a quiet spell. Required, at least 1.
	Requests int `json:"requests,omitempty"`

	// The interval requests are counted over. Required, positive.
	Interval caddy.Duration `json:"interval,omitempty"`

	// A placeholder that gives each value its own bucket, resolved with
	// the batch request (for async jobs, with the connection facts and
	// inherited headers they keep), such as
	// {http.request.header.X-Tenant}. At most 10,000 keys are kept; idle
	// ones are dropped, and keys beyond the bound share one bucket.
	// Default: one bucket for all.
	Key string `json:"key,omitempty"`
}

// paceRate is the rate for the gate, nil for none.
func (rc *RateConfig) paceRate() *pace.Rate {
	if rc == nil {
		return nil
	}
	return &pace.Rate{Requests: rc.Requests, Interval: time.Duration(rc.Interval)}
}

func (rc *RateConfig) validate() error {
	switch {
	case rc.Requests < 1:
		return fmt.Errorf("rate: requests must be at least 1, got %d", rc.Requests)
	case rc.Interval <= 0:
		return fmt.Errorf("rate: interval must be positive, got %s", time.Duration(rc.Interval))
	}
	return nil
}
