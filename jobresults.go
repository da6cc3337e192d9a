package batch

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/tidwall/gjson"
	"go.uber.org/zap"
)

// A job's results read back, at every status: those final so far, in
// operation order, a page in the format the job was submitted in or NDJSON,
// followed until the job ends, filtered by outcome. Failed and skipped
// results are read from the failures stream (failureIndex), so that
// reading them costs what they are, not what the job is.

// resultsQuery is what a reader asks of a job's results.
type resultsQuery struct {
	offset int
	limit  int // 0: every result from offset
	// outcomes holds 1<<outcome of each outcome asked for; filtered is
	// set when ?outcome= is given: each result then says its index.
	outcomes uint8
	filtered bool
	request  bool // include=request
	follow   bool
}

// maxPageLimit bounds ?limit=; a larger page is answered in parts.
const maxPageLimit = 10000

const failureOutcomes = 1<<outcomeFailed | 1<<outcomeSkipped

// parseResultsQuery reads the query of a results request; msg says what
// is wrong with it.
func parseResultsQuery(u *url.URL, ndjson bool) (q resultsQuery, msg string) {
	v := u.Query()
	var err error
	if s := v.Get("offset"); s != "" {
		if q.offset, err = strconv.Atoi(s); err != nil || q.offset < 0 {
			return q, "offset must be a whole number ≥ 0"
		}
	}
	if s := v.Get("limit"); s != "" {
		if q.limit, err = strconv.Atoi(s); err != nil || q.limit < 1 || q.limit > maxPageLimit {
			return q, fmt.Sprintf("limit must be a whole number from 1 to %d", maxPageLimit)
		}
	}
	if names, ok := v["outcome"]; ok {
		q.filtered = true
		for _, name := range strings.Split(strings.Join(names, ","), ",") {
			k := slices.Index(outcomeNames[:], strings.TrimSpace(name))
			if k < 0 {
				return q, fmt.Sprintf("unknown outcome %q: outcome takes succeeded, failed or skipped, comma-separated", short(name))
			}
			q.outcomes |= 1 << k
		}
	}
	for _, s := range v["include"] {
		for _, what := range strings.Split(s, ",") {
			if what != "request" {
				return q, fmt.Sprintf("unknown include %q: include takes request", short(what))
			}
			q.request = true
		}
	}
	if q.request && (!q.filtered || q.outcomes&^failureOutcomes != 0) {
		return q, "include=request serves failed and skipped operations: ask with outcome=failed, outcome=skipped or outcome=failed,skipped"
	}
	if s := v.Get("follow"); s != "" {
		if q.follow, err = strconv.ParseBool(s); err != nil {
			return q, "follow must be true or false"
		}
		if q.follow && !ndjson {
			return q, "follow streams NDJSON: ask with Accept: application/x-ndjson"
		}
	}
	return q, ""
}

// readableRecord is the record whose results a reader may read: of a job
// this process runs, as of the last results stored.
func (j *job) readableRecord() jobRecord {
	rec := j.snapshot()
	if p := j.readable.Load(); p != nil && !rec.final() {
		return *p
	}
	return rec
}

// eachResult calls put with each stored result of rec that q asks for,
// from q.offset on, in order, until put returns false: its index, the
// result as stored, and its request when q asks for it. It returns where
// a reader goes on from: after the last result put when put stopped,
// else after the results stored.
func (a *asyncJobs) eachResult(ctx context.Context, rec jobRecord, q resultsQuery, put func(i int, item, request []byte) bool) (next int, err error) {
	end := rec.Completed - rec.Unstored
	next = max(q.offset, end)
	stop := func(i int, item, request []byte) bool {
		if !put(i, item, request) {
			next = i + 1
			return false
		}
		return true
	}
	failures := q.filtered && q.outcomes&^failureOutcomes == 0 && rec.Failures.Kept
	switch {
	case q.request && !failures:
		return next, errNoRequests
	case q.offset >= end:
		return next, nil // nothing final there yet: a follower waiting reads nothing
	case failures:
		err = a.store.eachFailure(ctx, rec, q.offset, end, func(i, outcome int, item, request []byte) bool {
			if q.outcomes&(1<<outcome) == 0 {
				return true
			}
			if !q.request {
				request = nil
			}
			return stop(i, item, request)
		})
		return next, err
	}
	err = a.store.storedRange(ctx, rec, q.offset, end, func(i int, item []byte) bool {
		if q.filtered && q.outcomes&(1<<storedOutcome(item)) == 0 {
			return true
		}
		return stop(i, item, nil)
	})
	return next, err
}

var errNoRequests = errors.New("this job was started by a version that kept no requests of its results: include=request is not served for it")

// storedOutcome is how a stored result counts.
func storedOutcome(item []byte) int {
	v := gjson.GetManyBytes(item, "status", "error")
	return outcomeOf(&result{status: int(v[0].Int()), err: v[1].String()})
}

// writeResults answers GET <batch path>/ID/results.
func (a *asyncJobs) writeResults(w http.ResponseWriter, r *http.Request, j *job, rec jobRecord) error {
	ndjson := wantsNDJSON(r)
	q, msg := parseResultsQuery(r.URL, ndjson)
	if msg != "" {
		return writeError(w, http.StatusBadRequest, msg)
	}
	f := formatNamed(rec.Format)
	if f == nil {
		return caddyhttp.Error(http.StatusInternalServerError, fmt.Errorf("batch job %s: unknown format %q", rec.ID, rec.Format))
	}
	if q.request && f != native && !ndjson {
		return writeError(w, http.StatusBadRequest, "include=request is served in JSON and NDJSON: ask with Accept: application/x-ndjson")
	}
	readable := rec
	if j != nil {
		readable = j.readableRecord()
	}
	switch {
	case q.follow:
		return a.followResults(w, r, j, rec, q)
	case ndjson:
		return a.writeResultLines(w, r, rec, readable, q)
	case f == native:
		return a.writeResultPage(w, r, rec, readable, q)
	}
	return a.writeFormatPage(w, r, f, rec, readable, q)
}

// jobSummary is the summary of rec's results: a page of them when q
// pages them, and what follows them.
func jobSummary(r *http.Request, rec jobRecord, q resultsQuery, paged bool, next, stored int) summary {
	sum := summary{status: rec.Outcome, total: rec.Total, succeeded: rec.Succeeded, failed: rec.Failed,
		skipped: rec.Skipped, page: &page{complete: rec.final(), next: next}, metadata: rec.Metadata}
	if !rec.final() {
		sum.status = rec.Status
	}
	if rec.Status == stateError {
		sum.err = rec.Error
	}
	if paged {
		sum.page.offset, sum.page.limit = q.offset, cmp.Or(q.limit, rec.Total)
	}
	if rec.final() && next >= stored {
		sum.page.next = -1 // nothing is to come
	} else {
		sum.page.nextLink = withOffset(r.URL, next)
	}
	return sum
}

// withOffset is u, which asked for results, asking from offset on.
func withOffset(u *url.URL, offset int) string {
	q := u.Query()
	q.Set("offset", strconv.Itoa(offset))
	return u.Path + "?" + q.Encode()
}

// addShown adds a result to out as a view shows it, then end: with its
// index when the view is filtered or NDJSON, and its request when asked
// for.
func addShown(out *chunkWriter, i int, item, request []byte, indexed bool, end string) {
	if !indexed && request == nil {
		out.add(item)
	} else {
		out.buf = strconv.AppendInt(append(out.buf, `{"index":`...), int64(i), 10)
		out.buf = append(out.buf, ',')
		out.add(item[1 : len(item)-1])
		if request != nil {
			out.buf = append(out.buf, `,"request":`...)
			out.add(request)
		}
		out.buf = append(out.buf, '}')
	}
	out.buf = append(out.buf, end...)
	out.maybeWrite()
}

// writeResultPage writes a page of results as a native batch answers:
// {"results":[…], summary, "complete", "next"}, one part of results in
// memory at a time whatever the page's size.
func (a *asyncJobs) writeResultPage(w http.ResponseWriter, r *http.Request, rec, readable jobRecord, q resultsQuery) error {
	var out chunkWriter
	out.start(w, "application/json", `{"results":[`)
	n := 0
	next, err := a.eachResult(r.Context(), readable, q, func(i int, item, request []byte) bool {
		if n > 0 {
			out.buf = append(out.buf, ',')
		}
		addShown(&out, i, item, request, q.filtered, "")
		n++
		return q.limit == 0 || n < q.limit
	})
	if err != nil {
		return a.readFailed(w, rec, out.sent, err)
	}
	sum := jobSummary(r, rec, q, true, next, readable.Completed-readable.Unstored)
	out.buf = append(appendSummary(append(out.buf, ']'), sum), '}')
	out.finish()
	return nil
}

// writeResultLines writes results as NDJSON, one line each with its
// index, then the summary line.
func (a *asyncJobs) writeResultLines(w http.ResponseWriter, r *http.Request, rec, readable jobRecord, q resultsQuery) error {
	var out chunkWriter
	out.start(w, "application/x-ndjson", "")
	next, err := a.resultLines(r.Context(), &out, readable, q)
	if err != nil {
		return a.readFailed(w, rec, out.sent, err)
	}
	sum := jobSummary(r, rec, q, false, next, readable.Completed-readable.Unstored)
	out.buf = append(appendSummary(append(out.buf, `{"summary":true`...), sum), "}\n"...)
	out.finish()
	return nil
}

// resultLines appends to out the lines of the results q asks for.
func (a *asyncJobs) resultLines(ctx context.Context, out *chunkWriter, readable jobRecord, q resultsQuery) (next int, err error) {
	n := 0
	return a.eachResult(ctx, readable, q, func(i int, item, request []byte) bool {
		addShown(out, i, item, request, true, "\n")
		n++
		return q.limit == 0 || n < q.limit
	})
}

// followEvery is how often a follower looks for new results: of a job
// this process runs, and of one another instance runs (a read of its
// record each time).
var followEvery = [2]time.Duration{100 * time.Millisecond, 500 * time.Millisecond}

// followResults streams results as NDJSON as they become final, until the
// job ends, then the summary line. It holds a part of results at a time,
// and waits for a slow reader rather than read ahead of it.
func (a *asyncJobs) followResults(w http.ResponseWriter, r *http.Request, j *job, rec jobRecord, q resultsQuery) error {
	var out chunkWriter
	out.start(w, "application/x-ndjson", "")
	rc := http.NewResponseController(w)
	q.limit = 0
	for {
		readable := rec
		if j != nil {
			readable = j.readableRecord()
		}
		next, err := a.resultLines(r.Context(), &out, readable, q)
		if err != nil {
			return a.readFailed(w, rec, out.sent, err)
		}
		q.offset = next
		if rec.final() {
			sum := jobSummary(r, rec, q, false, next, readable.Completed-readable.Unstored)
			out.buf = append(appendSummary(append(out.buf, `{"summary":true`...), sum), "}\n"...)
			out.finish()
			return nil
		}
		out.write()
		_ = rc.Flush()
		wait := followEvery[1]
		if j != nil {
			wait = followEvery[0]
		}
		select {
		case <-r.Context().Done():
			return nil
		case <-time.After(wait):
		}
		if j, rec, err = a.current(r.Context(), rec.ID); err != nil {
			a.logger.Error("following batch job results", zap.String("id", rec.ID), zap.Error(err))
			panic(http.ErrAbortHandler)
		}
	}
}

// current returns the job id as it is now: the one this process runs, or
// its stored record.
func (a *asyncJobs) current(ctx context.Context, id string) (*job, jobRecord, error) {
	if j := a.pool.lookup(id); j != nil && j.a.store == a.store {
		return j, j.snapshot(), nil
	}
	rec, err := a.store.loadJob(ctx, id)
	return nil, rec, err
}

// writeFormatPage writes a page of results in the format of a job
// submitted as a JSON batch or multipart: each result decoded from its
// stored form, encoded as the format answers a batch. What follows the
// page is said as the format can: "complete", "next" and an
// "@odata.nextLink" in a JSON batch; headers in multipart, which a
// filtered page then reads twice, to learn where it ends before it
// starts.
func (a *asyncJobs) writeFormatPage(w http.ResponseWriter, r *http.Request, f format, rec, readable jobRecord, q resultsQuery) error {
	stored := readable.Completed - readable.Unstored
	upTo := func(n *int) func(int, []byte, []byte) bool {
		return func(int, []byte, []byte) bool { *n++; return q.limit == 0 || *n < q.limit }
	}
	if f == multipartMixed {
		next := max(stored, q.offset)
		if !q.filtered && q.limit > 0 {
			next = min(q.offset+q.limit, next)
		} else if q.filtered && q.limit > 0 {
			var n int
			var err error
			if next, err = a.eachResult(r.Context(), readable, q, upTo(&n)); err != nil {
				return a.readFailed(w, rec, false, err)
			}
		}
		sum := jobSummary(r, rec, q, true, next, stored)
		w.Header().Set("Batch-Complete", strconv.FormatBool(sum.page.complete))
		if sum.page.next >= 0 {
			w.Header().Set("Batch-Next", strconv.Itoa(sum.page.next))
			w.Header().Set("Link", "<"+sum.page.nextLink+`>; rel="next"`)
		}
	}
	b := &batch{format: f, form: formEnvelope}
	s := f.sink(w, r, b)
	if ix, ok := s.(indexingSink); ok && q.filtered {
		ix.showIndex()
	}
	put, n := false, 0
	next, err := a.eachResult(r.Context(), readable, q, func(i int, item, _ []byte) bool {
		op, res := decodeStored(item)
		s.put(i, op, &res)
		put = true
		n++
		return q.limit == 0 || n < q.limit
	})
	if err != nil {
		return a.readFailed(w, rec, put, err)
	}
	s.close(jobSummary(r, rec, q, true, next, stored))
	return nil
}

// indexingSink is a sink that can say each result's index.
type indexingSink interface{ showIndex() }

// readFailed answers a read of results that storage failed: an error when
// nothing is written yet; after, the answer is cut off rather than sent
// wrong.
func (a *asyncJobs) readFailed(w http.ResponseWriter, rec jobRecord, sent bool, err error) error {
	switch {
	case errors.Is(err, errNoRequests):
		return writeError(w, http.StatusConflict, err.Error())
	case errors.Is(err, errBadRecord) && !sent:
		a.logger.Error("the stored results of a batch job are damaged", zap.String("id", rec.ID), zap.Error(err))
		return writeError(w, http.StatusInternalServerError, "the stored results of this batch job are damaged: "+err.Error())
	case !sent:
		return caddyhttp.Error(http.StatusServiceUnavailable, err)
	}
	a.logger.Error("loading batch job results", zap.String("id", rec.ID), zap.Error(err))
	panic(http.ErrAbortHandler)
}
