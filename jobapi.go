package batch

import (
	"context"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/tidwall/gjson"
	"go.uber.org/zap"
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
func (h *Handler) submit(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, b *batch, body []byte) error {
	j, err := h.newJob(w, r, next, b.format)
	if j == nil {
		return err
	}
	j.spec.Shape, j.spec.Starts = shapeBody, []int{0}
	if err := h.storeChunk(r.Context(), j.spec, j.rec.ID, 0, body); err != nil {
		return j.drop(caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("storing async batch: %w", err)))
	}
	return h.queueJob(w, r, j, len(b.ops))
}

// newJob holds a place in the queue for a job of the batch request r and
// returns the job, whose operations are to be stored next; nil when the
// request was answered (or err says why not).
func (h *Handler) newJob(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, f format) (*job, error) {
	owner, ok := h.ownerHash(r)
	if !ok {
		return nil, h.refuseNoOwner(w, f)
	}
	srv, err := serverOf(r)
	if err != nil {
		return nil, err
	}
	if err := h.pool.reserve(); err != nil {
		return nil, err
	}
	key := endpointKey(srv, r, strings.TrimSuffix(r.URL.Path, "/"))
	ep := endpoint{h: h, next: next, srv: srv}
	h.pool.serveAt(key, ep)
	id := newBatchID()
	conn := connFactsOf(r)
	spec := &jobSpec{ContentType: r.Header.Get("Content-Type"), Path: r.URL.Path, Conn: storeConn(conn),
		Endpoint: key, SealedOps: h.sealer != nil}
	_, spec.Handler, _ = h.self()
	rec := jobRecord{progress: progress{ID: id, Status: jobQueued, CreatedAt: now()}, Owner: owner}
	rec.ExpiresAt = rec.CreatedAt.Add(time.Duration(h.Async.Retention))
	if f != native {
		rec.Format = f.name()
	}
	return &job{h: h, endpoint: key, spec: spec, rec: rec, rn: h.jobRunner(ep, id, conn, inheritedHeaders(r.Header, h.inherit))}, nil
}

// drop gives up a job that was not queued: its place, and what it stored.
func (j *job) drop(err error) error {
	h, id := j.h, j.rec.ID
	h.pool.unreserve()
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	if j.lease != nil {
		j.lease.release(ctx)
	}
	if err := deleteTree(ctx, h.storage, jobKey(id)); err != nil {
		h.logger.Warn("deleting refused batch job", zap.String("id", id), zap.Error(err))
	}
	h.deactivate(id)
	return err
}

// queueJob stores a job of n operations, which are stored, queues it and
// answers 202.
func (h *Handler) queueJob(w http.ResponseWriter, r *http.Request, j *job, n int) error {
	id, spec := j.rec.ID, j.spec
	ctx := context.WithoutCancel(r.Context())
	j.rec.Total = n
	err := h.keepHeaders(spec, id, j.rn.inherited)
	if err == nil {
		err = h.storeSpec(ctx, id, spec)
	}
	if err == nil {
		err = j.save(ctx)
	}
	// Leased before it is listed: an instance looking for jobs to take
	// over must never find it without its lease.
	if err == nil {
		j.lease, err = h.takeLease(ctx, id, true)
	}
	if err == nil {
		err = h.activate(ctx, id)
	}
	if err != nil {
		return j.drop(caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("storing async batch: %w", err)))
	}
	queued := j.snapshot().progress
	if err := h.pool.submit(j); err != nil {
		// The pool ended while the job was stored: nothing would run it.
		return j.drop(err)
	}
	h.metrics.jobs.WithLabelValues(jobQueued).Inc()
	h.logger.Info("async batch queued", zap.String("id", id), zap.Int("operations", n), zap.Bool("resumable", j.resumable()))

	w.Header().Set("Location", strings.TrimSuffix(r.URL.Path, "/")+"/"+id)
	if wantsAsync(r) {
		w.Header().Set("Preference-Applied", "respond-async")
	}
	return writeProgress(w, http.StatusAccepted, queued)
}

func (h *Handler) storeSpec(ctx context.Context, id string, spec *jobSpec) error {
	buf, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	return h.storage.Store(ctx, jobKey(id, "spec"), buf)
}

// jobRunner returns the runner of a job, which runs through ep; its
// operations are loaded as it runs.
func (h *Handler) jobRunner(ep endpoint, id string, conn connFacts, inherited http.Header) *runner {
	rn := &runner{h: ep.h, id: id, next: ep.next, srv: ep.srv, conn: conn, base: context.Background(),
		timeout: time.Duration(h.Async.Retention), inherited: inherited, stoppedAt: -1, opKey: ep.h.opKey}
	rn.refs.reset(ep.h.MaxReferenceSize)
	rn.logs = rn.accessLoggers()
	return rn
}

// jobPath splits a request path into a job id and what of the job it asks
// for ("" or "results"); ok is false for other paths.
func jobPath(p string) (id, sub string, ok bool) {
	p = strings.TrimSuffix(p, "/")
	if rest, found := strings.CutSuffix(p, "/results"); found {
		p, sub = rest, "results"
	}
	id = p[strings.LastIndexByte(p, '/')+1:]
	if len(id) != 32 || strings.Trim(id, "0123456789abcdef") != "" {
		return "", "", false
	}
	return id, sub, true
}

// serveJob answers the job endpoints: progress, results and cancel.
func (h *Handler) serveJob(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, id, sub string) error {
	// This handler serves the batch path: jobs queued there start on it.
	if srv, err := serverOf(r); err == nil {
		batchPath := r.URL.Path[:strings.LastIndex(r.URL.Path, id)-1]
		h.pool.serveAt(endpointKey(srv, r, batchPath), endpoint{h: h, next: next, srv: srv})
	}
	allow := "GET, DELETE"
	if sub == "results" {
		allow = "GET"
	}
	if r.Method != http.MethodGet && (r.Method != http.MethodDelete || sub != "") {
		w.Header().Set("Allow", allow)
		return writeError(w, http.StatusMethodNotAllowed, "batch jobs take "+allow)
	}
	owner, ok := h.ownerHash(r)
	if !ok {
		return h.refuseNoOwner(w, native)
	}
	j := h.pool.lookup(id)
	var rec jobRecord
	if j != nil && j.h.storage == h.storage {
		rec = j.snapshot()
	} else {
		j = nil
		var err error
		if rec, err = h.loadJob(r.Context(), id); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return writeError(w, http.StatusNotFound, "no such batch job")
			}
			return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("loading batch job: %w", err))
		}
	}
	// Someone else's job, or an expired one, does not exist for this caller.
	if subtle.ConstantTimeCompare([]byte(rec.Owner), []byte(owner)) != 1 || now().After(rec.ExpiresAt) {
		return writeError(w, http.StatusNotFound, "no such batch job")
	}

	switch {
	case r.Method == http.MethodDelete:
		return h.cancelJob(w, r, j, rec)
	case sub == "results":
		if !rec.final() {
			return writeProgress(w, http.StatusConflict, rec.progress)
		}
		return h.writeResults(w, r, rec)
	default:
		return writeProgress(w, http.StatusOK, rec.progress)
	}
}

func (h *Handler) loadJob(ctx context.Context, id string) (jobRecord, error) {
	var rec jobRecord
	buf, err := h.storage.Load(ctx, jobKey(id, "job"))
	if err != nil {
		return rec, err
	}
	if err := json.Unmarshal(buf, &rec); err != nil {
		return rec, fmt.Errorf("%w: job %s: %w", errBadRecord, id, err)
	}
	return rec, nil
}

// cancelJob stops a job: what has not started is skipped (424).
func (h *Handler) cancelJob(w http.ResponseWriter, r *http.Request, j *job, rec jobRecord) error {
	if rec.final() {
		return writeProgress(w, http.StatusConflict, rec.progress)
	}
	if j == nil {
		// Another instance runs it: it watches for this key.
		if err := h.storage.Store(r.Context(), jobKey(rec.ID, "cancel"), []byte("1")); err != nil {
			return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("canceling batch job: %w", err))
		}
		return writeProgress(w, http.StatusAccepted, rec.progress)
	}
	j.requestCancel()
	if h.pool.dequeue(j) {
		go h.pool.run(j)
	}
	// The operation in flight finishes; wait briefly for the job to settle.
	deadline := time.After(5 * time.Second)
	for {
		rec = j.snapshot()
		if rec.final() {
			return writeProgress(w, http.StatusOK, rec.progress)
		}
		select {
		case <-deadline:
			return writeProgress(w, http.StatusAccepted, rec.progress)
		case <-r.Context().Done():
			return nil
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// maxPageLimit bounds ?limit=; a larger page is answered in parts.
const maxPageLimit = 10000

// writeResults streams an ended job's results from storage, a part at a
// time: ?offset= and ?limit= page them. A job that ended "error" serves
// the results that were stored, and says why the rest are not.
func (h *Handler) writeResults(w http.ResponseWriter, r *http.Request, rec jobRecord) error {
	q := r.URL.Query()
	offset, limit := 0, rec.Total
	var err error
	if v := q.Get("offset"); v != "" {
		if offset, err = strconv.Atoi(v); err != nil || offset < 0 {
			return writeError(w, http.StatusBadRequest, "offset must be a whole number ≥ 0")
		}
	}
	if v := q.Get("limit"); v != "" {
		if limit, err = strconv.Atoi(v); err != nil || limit < 1 || limit > maxPageLimit {
			return writeError(w, http.StatusBadRequest, fmt.Sprintf("limit must be a whole number from 1 to %d", maxPageLimit))
		}
	}
	stored := rec.Completed - rec.Unstored
	end := stored
	if offset < stored && limit < stored-offset {
		end = offset + limit
	}

	f := formatNamed(rec.Format)
	if f == nil {
		return caddyhttp.Error(http.StatusInternalServerError, fmt.Errorf("batch job %s: unknown format %q", rec.ID, rec.Format))
	}
	sum := summary{status: rec.Outcome, total: rec.Total, succeeded: rec.Succeeded, failed: rec.Failed,
		skipped: rec.Skipped, page: &page{offset: offset, limit: limit}}
	if rec.Status == jobError {
		sum.err = rec.Error
	}
	if wantsNDJSON(r) {
		sum.page = nil
		return h.writeResultLines(w, r, rec, offset, sum)
	}
	if f == native {
		return h.eachStored(w, r, rec, offset, end, func(_ int, item []byte, first bool) {
			if first {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusOK)
				_, _ = w.Write([]byte(`{"results":[`))
			} else {
				_, _ = w.Write([]byte{','})
			}
			_, _ = w.Write(item) // results are stored as the native format has them
		}, func(any bool) {
			out := []byte(nil)
			if !any {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusOK)
				out = append(out, `{"results":[`...)
			}
			out = appendSummary(append(out, ']'), sum)
			_, _ = w.Write(append(out, '}'))
		})
	}
	// Another format: each result decoded from its stored form, and
	// encoded as a batch of the format answers it.
	b := &batch{format: f, form: formEnvelope}
	s := f.sink(w, r, b)
	return h.eachStored(w, r, rec, offset, end, func(i int, item []byte, _ bool) {
		op, res := decodeStored(item)
		s.put(i, op, &res)
	}, func(bool) { s.close(sum) })
}

// writeResultLines streams every stored result of rec from offset on,
// one NDJSON line each with its index, then the summary line, as a batch
// streamed with Accept: application/x-ndjson answers: one part of results
// is in memory at a time, whatever the job's size.
func (h *Handler) writeResultLines(w http.ResponseWriter, r *http.Request, rec jobRecord, offset int, sum summary) error {
	rc := http.NewResponseController(w)
	var out []byte
	start := func() {
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
	}
	return h.eachStored(w, r, rec, offset, rec.Completed-rec.Unstored, func(i int, item []byte, first bool) {
		if first {
			start()
		}
		out = strconv.AppendInt(append(out, `{"index":`...), int64(i), 10)
		out = append(append(append(out, ','), item[1:]...), '\n')
		if len(out) >= 32<<10 {
			_, _ = w.Write(out)
			_ = rc.Flush()
			out = out[:0]
		}
	}, func(any bool) {
		if !any {
			start()
		}
		out = appendSummary(append(out, `{"summary":true`...), sum)
		_, _ = w.Write(append(out, "}\n"...))
	})
}

// eachStored calls put with each stored result of rec from offset up to
// end, loading one part at a time, then done. Storage failing before
// anything is written is a 503; after, the answer is cut off rather than
// sent wrong.
func (h *Handler) eachStored(w http.ResponseWriter, r *http.Request, rec jobRecord, offset, end int,
	put func(i int, item []byte, first bool), done func(any bool)) error {
	first := true
	started, err := h.storedRange(r.Context(), rec, offset, end, func(i int, item []byte) {
		put(i, item, first)
		first = false
	})
	switch {
	case err != nil && !started:
		return caddyhttp.Error(http.StatusServiceUnavailable, err)
	case err != nil:
		h.logger.Error("loading batch job results", zap.String("id", rec.ID), zap.Error(err))
		panic(http.ErrAbortHandler)
	}
	done(!first)
	return nil
}

// storedRange calls put with each stored result of rec from offset up to
// end, loading one part at a time; started says whether any part loaded.
func (h *Handler) storedRange(ctx context.Context, rec jobRecord, offset, end int, put func(i int, item []byte)) (started bool, err error) {
	stored := rec.Completed - rec.Unstored
	for c := offset / resultsPerChunk; c*resultsPerChunk < end; c++ {
		i := c * resultsPerChunk // index of the next result read
		last := min(i+resultsPerChunk, stored)
		for part := 0; i < last && i < end; part++ {
			buf, err := h.storage.Load(ctx, partKey(rec.ID, c, part))
			if err == nil && len(buf) == 0 {
				err = errors.New("empty part")
			}
			if err != nil {
				return started, fmt.Errorf("loading batch job results: chunk %d part %d: %w", c, part, err)
			}
			started = true
			for _, item := range jsontext.SplitTop(buf) {
				if i >= offset && i < end {
					put(i, item)
				}
				i++
			}
		}
	}
	return started, nil
}

// loadEarlier reads back the stored results of the first n operations of
// the batch rn runs, whose first is operation first of the job, when what
// comes after depends on them or refers to them.
func (h *Handler) loadEarlier(ctx context.Context, rec jobRecord, rn *runner, first, n int) error {
	if !slices.ContainsFunc(rn.b.ops[n:], func(op *operation) bool { return len(op.deps) > 0 || op.refs != nil }) {
		return nil
	}
	_, err := h.storedRange(ctx, rec, first, first+n, func(i int, item []byte) {
		_, res := decodeStored(item)
		if res.body != nil && !res.isJSON {
			res.isJSON = jsonBody(res.header, res.body)
		}
		rn.results[i-first] = res
	})
	return err
}

// decodeStored reads back a result stored as appendResult wrote it.
func decodeStored(item []byte) (*operation, result) {
	v := gjson.ParseBytes(item)
	op := &operation{id: v.Get("id").String(), groupName: v.Get("atomicityGroup").String()}
	return op, storedResult(v)
}

func storedResult(v gjson.Result) result {
	res := result{status: int(v.Get("status").Int()), err: v.Get("error").String(), attempts: int(v.Get("attempts").Int())}
	if h := v.Get("headers"); h.IsObject() {
		res.header = http.Header{}
		h.ForEach(func(k, val gjson.Result) bool {
			res.header[k.String()] = []string{val.String()}
			return true
		})
	}
	switch body := v.Get("body"); {
	case !body.Exists():
	case v.Get("body_encoding").String() == "base64":
		res.body, _ = base64.StdEncoding.DecodeString(body.Str)
	case body.Type == gjson.String && !isJSONType(contentType(res.header)):
		res.body = []byte(body.Str)
	default:
		res.body, res.isJSON = []byte(body.Raw), true
	}
	if u := v.Get("undone"); u.Exists() {
		undone := u.Bool()
		res.undone = &undone
	}
	if rb := v.Get("rollback"); rb.IsObject() {
		rr := storedResult(rb)
		res.rollback = &rr
	}
	return res
}

func writeProgress(w http.ResponseWriter, status int, p progress) error {
	buf, err := json.Marshal(p)
	if err != nil {
		return err
	}
	writeJSON(w, status, buf)
	return nil
}
