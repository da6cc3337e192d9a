package batch

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/tidwall/gjson"
)

// jobPath splits a request path into a job id and what of the job it asks
// for ("", "results" or "retry"); ok is false for other paths.
func jobPath(p string) (id, sub string, ok bool) {
	p = strings.TrimSuffix(p, "/")
	if rest, found := strings.CutSuffix(p, "/results"); found {
		p, sub = rest, "results"
	} else if rest, found := strings.CutSuffix(p, "/retry"); found {
		p, sub = rest, "retry"
	}
	id = p[strings.LastIndexByte(p, '/')+1:]
	if !isJobID(id) {
		return "", "", false
	}
	return id, sub, true
}

// serveJob answers the job endpoints: progress, results, cancel and rerun.
func (a *asyncJobs) serve(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, id, sub string) error {
	allow := "GET, DELETE"
	switch sub {
	case "results":
		allow = "GET"
	case "retry":
		allow = "POST"
	}
	if !slices.Contains(strings.Split(allow, ", "), r.Method) {
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
		return a.cancelJob(w, r, next, j, rec)
	case sub == "results":
		return a.writeResults(w, r, j, rec)
	case sub == "retry":
		return a.rerun(w, r, next, j, rec)
	default:
		return writeProgress(w, http.StatusOK, rec.progress)
	}
}

// cancelJob stops a job: what has not started is skipped (424).
func (a *asyncJobs) cancelJob(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, j *job, rec jobRecord) error {
	if rec.final() {
		return writeProgress(w, http.StatusConflict, rec.progress)
	}
	if j == nil {
		// Another instance runs it: it watches for this key.
		if err := a.store.Store(r.Context(), jobKey(rec.ID, "cancel"), []byte("1")); err != nil {
			return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("canceling batch job: %w", err))
		}
		srv, err := serverOf(r)
		if rec.Status != stateQueued || err != nil {
			return writeProgress(w, http.StatusAccepted, rec.progress)
		}
		// Still in the cluster's queue: taken from it, it ends at once.
		if j = a.cancelQueued(r.Context(), rec, endpoint{h: a.h, next: next, srv: srv}); j == nil {
			return writeProgress(w, http.StatusAccepted, rec.progress)
		}
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
