package batch

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/tidwall/gjson"
	"go.uber.org/zap"
)

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
func (a *asyncJobs) serve(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, id, sub string) error {
	allow := "GET, DELETE"
	if sub == "results" {
		allow = "GET"
	}
	if r.Method != http.MethodGet && (r.Method != http.MethodDelete || sub != "") {
		w.Header().Set("Allow", allow)
		return writeError(w, http.StatusMethodNotAllowed, "batch jobs take "+allow)
	}
	who, err := a.h.owners.of(r)
	if err != nil {
		return a.h.owners.refuse(w, native, err)
	}
	j := a.pool.lookup(id)
	var rec jobRecord
	if j != nil && j.a.store == a.store {
		rec = j.snapshot()
	} else {
		j = nil
		var err error
		if rec, err = a.store.loadJob(r.Context(), id); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return writeError(w, http.StatusNotFound, "no such batch job")
			}
			return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("loading batch job: %w", err))
		}
	}
	// Someone else's job, or an expired one, does not exist for this caller.
	if !who.is(rec.Owner) || now().After(rec.ExpiresAt) {
		return writeError(w, http.StatusNotFound, "no such batch job")
	}
	// This handler serves the batch path of its owner's job: jobs queued
	// there start on it. Only then: the key holds a Host and a path the
	// client chose.
	if srv, err := serverOf(r); err == nil {
		batchPath := r.URL.Path[:strings.LastIndex(r.URL.Path, id)-1]
		a.pool.serveAt(endpointKey(srv, r, batchPath), endpoint{h: a.h, next: next, srv: srv})
	}

	switch {
	case r.Method == http.MethodDelete:
		return a.cancelJob(w, r, j, rec)
	case sub == "results":
		if !rec.final() {
			return writeProgress(w, http.StatusConflict, rec.progress)
		}
		return a.writeResults(w, r, rec)
	default:
		return writeProgress(w, http.StatusOK, rec.progress)
	}
}

// cancelJob stops a job: what has not started is skipped (424).
func (a *asyncJobs) cancelJob(w http.ResponseWriter, r *http.Request, j *job, rec jobRecord) error {
	if rec.final() {
		return writeProgress(w, http.StatusConflict, rec.progress)
	}
	if j == nil {
		// Another instance runs it: it watches for this key.
		if err := a.store.Store(r.Context(), jobKey(rec.ID, "cancel"), []byte("1")); err != nil {
			return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("canceling batch job: %w", err))
		}
		return writeProgress(w, http.StatusAccepted, rec.progress)
	}
	j.requestCancel()
	if a.pool.dequeue(j) {
		go a.pool.run(j)
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
func (a *asyncJobs) writeResults(w http.ResponseWriter, r *http.Request, rec jobRecord) error {
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
		skipped: rec.Skipped, page: &page{offset: offset, limit: limit}, metadata: rec.Metadata}
	if rec.Status == stateError {
		sum.err = rec.Error
	}
	if wantsNDJSON(r) {
		sum.page = nil
		return a.writeResultLines(w, r, rec, offset, sum)
	}
	if f == native {
		return a.eachStored(w, r, rec, offset, end, func(_ int, item []byte, first bool) {
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
	return a.eachStored(w, r, rec, offset, end, func(i int, item []byte, _ bool) {
		op, res := decodeStored(item)
		s.put(i, op, &res)
	}, func(bool) { s.close(sum) })
}

// writeResultLines streams every stored result of rec from offset on,
// one NDJSON line each with its index, then the summary line, as a batch
// streamed with Accept: application/x-ndjson answers: one part of results
// is in memory at a time, whatever the job's size.
func (a *asyncJobs) writeResultLines(w http.ResponseWriter, r *http.Request, rec jobRecord, offset int, sum summary) error {
	rc := http.NewResponseController(w)
	var out []byte
	start := func() {
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
	}
	return a.eachStored(w, r, rec, offset, rec.Completed-rec.Unstored, func(i int, item []byte, first bool) {
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
func (a *asyncJobs) eachStored(w http.ResponseWriter, r *http.Request, rec jobRecord, offset, end int,
	put func(i int, item []byte, first bool), done func(any bool)) error {
	first := true
	err := a.store.storedRange(r.Context(), rec, offset, end, func(i int, item []byte) {
		put(i, item, first)
		first = false
	})
	switch {
	case errors.Is(err, errBadRecord) && first:
		a.logger.Error("the stored results of a batch job are damaged", zap.String("id", rec.ID), zap.Error(err))
		return writeError(w, http.StatusInternalServerError, "the stored results of this batch job are damaged: "+err.Error())
	case err != nil && first:
		return caddyhttp.Error(http.StatusServiceUnavailable, err)
	case err != nil:
		a.logger.Error("loading batch job results", zap.String("id", rec.ID), zap.Error(err))
		panic(http.ErrAbortHandler)
	}
	done(!first)
	return nil
}

// decodeStored reads back a result stored as appendResult wrote it.
func decodeStored(item []byte) (*operation, result) {
	v := gjson.ParseBytes(item)
	op := &operation{id: v.Get("id").String(), groupName: v.Get("atomicityGroup").String()}
	return op, storedResult(v)
}

func storedResult(v gjson.Result) result {
	res := result{status: int(v.Get("status").Int()), err: v.Get("error").String(), attempts: int(v.Get("attempts").Int())}
	if hdr := v.Get("headers"); hdr.IsObject() {
		res.header = http.Header{}
		hdr.ForEach(func(k, val gjson.Result) bool {
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
