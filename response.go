package batch

import (
	"bytes"
	"cmp"
	"encoding/base64"
	"encoding/json"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/caddy-batch/batch/internal/pace"
)

// Statuses the batch layer gives operations it did not let the chain answer.
const (
	statusSkipped = http.StatusFailedDependency // 424: not run
	// statusClientGone marks operations cut off because the client left;
	// nobody reads them but logs (Caddy uses 499 the same way).
	statusClientGone = 499
)

// result is the answer of one operation.
type result struct {
	status int
	header http.Header
	body   []byte
	// err is set when the batch layer, not the handler chain, decided the
	// status.
	err string
	// Under all_or_nothing, for an operation that succeeded before the
	// batch failed: whether it was undone, and by what.
	undone   *bool
	rollback *result
	// attempts counts the tries of an operation sent downstream; shown
	// when more than one.
	attempts int
	// cut is set when the batch's end (timeout, client gone, shutdown)
	// kept the operation from finishing.
	cut bool
	// isJSON is set when body is JSON that can be embedded as it is;
	// decided once, as references read it again.
	isJSON bool
	// w is the writer that holds header and body, for reuse once written.
	w *opWriter
}

// failed reports whether a finished operation counts as failed for those
// depending on it.
func (res *result) failed() bool { return res.status >= 400 }

// unmet reports whether the operation was skipped by its condition.
func (res *result) unmet() bool {
	return res.status == http.StatusPreconditionFailed && res.err == errConditionFalse
}

// summary counts the outcome of a batch.
type summary struct {
	status                            string
	total, succeeded, failed, skipped int
	retryAfter                        int // seconds; 0 when no operation was told to wait
	// cut counts operations the batch's end kept from finishing: a batch
	// with any did not run to its end.
	cut int
	// page and err are set on the results of a job: which of them, and
	// why the job ended in error.
	page *page
	err  string
	// metadata is the batch's or job's, echoed after the counts.
	metadata map[string]string
}

// page is which results of a job an answer holds, and what follows them.
type page struct {
	offset, limit int // limit 0: not paged (NDJSON)
	// complete is set once the job has ended: no result is to come.
	complete bool
	// next is where to ask next, -1 at the end; nextLink the URL that
	// asks there.
	next     int
	nextLink string
}

// Envelope statuses.
const (
	statusCompleted           = "completed"
	statusCompletedWithErrors = "completed_with_errors"
	statusAborted             = "aborted"
	statusRolledBack          = "rolled_back"
	statusRollbackFailed      = "rollback_failed"
	// statusStopped: the failure budget skipped operations (SPEC §13).
	statusStopped = "stopped"
	// statusExpired: a job's window passed before its operations ran.
	statusExpired = "expired"
)

// How one operation counts in a summary.
const (
	outcomeSucceeded = iota
	outcomeFailed
	outcomeSkipped
)

// outcomeNames are the outcomes as ?outcome= and the failures stream
// name them.
var outcomeNames = [...]string{outcomeSucceeded: "succeeded", outcomeFailed: "failed", outcomeSkipped: "skipped"}

// outcomeOf counts answers below 400 as succeeded, and operations the
// batch layer did not run (424, or 412 for a false condition) as skipped.
func outcomeOf(res *result) int {
	switch {
	case res.status < 400:
		return outcomeSucceeded
	case res.status == statusSkipped && res.err != "", res.unmet():
		return outcomeSkipped
	}
	return outcomeFailed
}

// sink takes a batch's results in request order, then its summary, and
// encodes them in its format.
type sink interface {
	put(index int, op *operation, res *result)
	close(s summary)
}

// emitter passes results to a sink in request order as soon as each one
// and all before it are final, so that a batch holds in memory only the
// answers that wait for an earlier one.
type emitter struct {
	out     sink
	ops     []*operation
	results []result
	// done marks final results; it is the emitter's own, as workers may be
	// writing the results after the next one to be written.
	done []bool
	next int // first index not yet written
	// hold keeps every result until finish.
	hold bool
	// retryAfter is the longest Retry-After of the 429 answers, in seconds.
	retryAfter int
}

func newEmitter(out sink, b *batch, results []result) *emitter {
	return &emitter{out: out, ops: b.ops, results: results, done: make([]bool, len(results))}
}

// ready marks result i final and writes what can be written.
func (e *emitter) ready(i int) {
	e.done[i] = true
	if !e.hold {
		e.flush()
	}
}

// flush writes every result that is final and has all before it written.
func (e *emitter) flush() {
	for e.next < len(e.results) && e.done[e.next] {
		res := &e.results[e.next]
		if res.status == http.StatusTooManyRequests {
			if wait, ok := pace.RetryAfter(res.header); ok {
				e.retryAfter = max(e.retryAfter, int((wait+time.Second-1)/time.Second))
			}
		}
		e.out.put(e.next, e.ops[e.next], res)
		// Written: free what no reference reads.
		if op := e.ops[e.next]; !op.keepHeader || !op.keepBody {
			res.w = nil
			if !op.keepHeader {
				res.header = nil
			}
			if !op.keepBody {
				res.body = nil
			}
		}
		e.next++
	}
}

// finish writes what is left and the summary.
func (e *emitter) finish(s summary) summary {
	e.flush()
	s.retryAfter = e.retryAfter
	e.out.close(s)
	return s
}

// appendHeaders appends "headers":{...}, names sorted, values joined.
func appendHeaders(dst []byte, h http.Header) []byte {
	dst = append(dst, `"headers":{`...)
	if v, ok := h["Content-Type"]; ok && len(h) == 1 && len(v) > 0 { // the usual answer: no sorting
		dst = append(dst, `"Content-Type":`...)
		dst = jsontext.AppendString(dst, strings.Join(v, ", "))
		return append(dst, '}')
	}
	var arr [16]string
	for i, name := range sortedNames(arr[:0], h) {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = jsontext.AppendString(dst, name)
		dst = append(dst, ':')
		dst = jsontext.AppendString(dst, strings.Join(h[name], ", "))
	}
	return append(dst, '}')
}

// chunkWriter writes an answer as it is made, in chunks of about
// sinkChunk bytes: one write per result would cost a pass through every
// response writer wrapper (Caddy's idle timeout resets the connection's
// deadline on each) for ~200 bytes. An answer that ends within its first
// chunk goes out whole, with a Content-Length.
type chunkWriter struct {
	w     http.ResponseWriter
	ctype string
	buf   []byte
	sent  bool // the status line and headers are written
	// status is the answer's status; 0 is 200.
	status int
}

const sinkChunk = 32 << 10

// sinkBufs holds chunk buffers between batches.
var sinkBufs = sync.Pool{New: func() any { return new([]byte) }}

func (c *chunkWriter) started() bool { return c.w != nil }

// start opens the answer with head.
func (c *chunkWriter) start(w http.ResponseWriter, ctype, head string) {
	c.w, c.ctype = w, ctype
	c.buf = append((*sinkBufs.Get().(*[]byte))[:0], head...)
}

// maybeWrite writes what is buffered once it fills a chunk.
func (c *chunkWriter) maybeWrite() {
	if len(c.buf) >= sinkChunk {
		c.write()
	}
}

// add appends b to the answer. What is larger than a chunk is written as
// it is, after what is buffered, rather than copied into the buffer: a
// reader of a job's results holds the part it loaded, not a copy.
func (c *chunkWriter) add(b []byte) {
	if len(b) < sinkChunk {
		c.buf = append(c.buf, b...)
		return
	}
	c.write()
	_, _ = c.w.Write(b)
}

// write sends what is buffered, after the status line the first time.
func (c *chunkWriter) write() {
	if !c.sent {
		c.sent = true
		c.w.Header().Set("Content-Type", c.ctype)
		c.w.WriteHeader(cmp.Or(c.status, http.StatusOK))
	}
	_, _ = c.w.Write(c.buf)
	c.buf = c.buf[:0]
}

// finish writes the rest of the answer.
func (c *chunkWriter) finish() {
	if !c.sent {
		c.w.Header().Set("Content-Length", strconv.Itoa(len(c.buf)))
	}
	c.write()
	if cap(c.buf) <= 4*sinkChunk { // one huge answer does not stay in the pool
		buf := c.buf[:0]
		sinkBufs.Put(&buf)
	}
	c.buf = nil
}

// sortedNames appends the names of h to names, in order. A name without
// values is left out, as Go's server leaves it off the wire: handlers set
// one so (Content-Type: nil) to keep Go from adding it.
func sortedNames(names []string, h http.Header) []string {
	for name, vs := range h {
		if len(vs) > 0 {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}

func writeJSON(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// appendSummary appends the envelope fields after "results".
func appendSummary(dst []byte, s summary) []byte {
	dst = append(dst, `,"status":`...)
	dst = jsontext.AppendString(dst, s.status)
	dst = append(dst, `,"total":`...)
	dst = strconv.AppendInt(dst, int64(s.total), 10)
	dst = append(dst, `,"succeeded":`...)
	dst = strconv.AppendInt(dst, int64(s.succeeded), 10)
	dst = append(dst, `,"failed":`...)
	dst = strconv.AppendInt(dst, int64(s.failed), 10)
	dst = append(dst, `,"skipped":`...)
	dst = strconv.AppendInt(dst, int64(s.skipped), 10)
	if s.retryAfter > 0 {
		dst = append(dst, `,"retry_after":`...)
		dst = strconv.AppendInt(dst, int64(s.retryAfter), 10)
	}
	if p := s.page; p != nil {
		if p.limit > 0 {
			dst = append(dst, `,"offset":`...)
			dst = strconv.AppendInt(dst, int64(p.offset), 10)
			dst = append(dst, `,"limit":`...)
			dst = strconv.AppendInt(dst, int64(p.limit), 10)
		}
		dst = appendFollows(dst, p)
	}
	if s.err != "" {
		dst = append(dst, `,"error":`...)
		dst = jsontext.AppendString(dst, s.err)
	}
	if len(s.metadata) > 0 {
		dst = append(dst, `,"metadata":{`...)
		for i, k := range slices.Sorted(maps.Keys(s.metadata)) {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = append(jsontext.AppendString(dst, k), ':')
			dst = jsontext.AppendString(dst, s.metadata[k])
		}
		dst = append(dst, '}')
	}
	return dst
}

// appendFollows appends what follows a page: "complete", and "next"
// unless nothing does.
func appendFollows(dst []byte, p *page) []byte {
	dst = strconv.AppendBool(append(dst, `,"complete":`...), p.complete)
	if p.next >= 0 {
		dst = strconv.AppendInt(append(dst, `,"next":`...), int64(p.next), 10)
	}
	return dst
}

// appendResult appends the JSON of one result, the form in which jobs
// store results too; index, unless negative, goes first (NDJSON).
func appendResult(dst []byte, index int, op *operation, res *result, lean leanOptions) []byte {
	dst = append(dst, '{')
	if index >= 0 {
		dst = append(dst, `"index":`...)
		dst = strconv.AppendInt(dst, int64(index), 10)
		dst = append(dst, ',')
	}
	dst = append(dst, `"id":`...)
	dst = jsontext.AppendString(dst, op.id)
	if op.source > 0 {
		dst = strconv.AppendInt(append(dst, `,"source_index":`...), int64(op.source-1), 10)
	}
	if op.groupName != "" { // an operation of a JSON or multipart batch
		dst = append(dst, `,"atomicityGroup":`...)
		dst = jsontext.AppendString(dst, op.groupName)
	}
	dst = append(dst, `,"status":`...)
	dst = strconv.AppendInt(dst, int64(res.status), 10)
	if res.attempts > 1 {
		dst = append(dst, `,"attempts":`...)
		dst = strconv.AppendInt(dst, int64(res.attempts), 10)
	}
	quiet := lean.omitSuccess && res.status >= 200 && res.status < 300
	if len(res.header) > 0 && !quiet && !lean.noHeaders {
		dst = appendHeaders(append(dst, ','), res.header)
	}
	if len(res.body) > 0 && !quiet {
		dst = append(dst, `,"body":`...)
		switch {
		case res.isJSON:
			// Space around a JSON value means nothing; APIs often end with "\n".
			body := bytes.TrimSpace(res.body)
			if lean.oneLine && bytes.ContainsAny(body, "\r\n") {
				var buf bytes.Buffer
				_ = json.Compact(&buf, body) // valid: checked above
				body = buf.Bytes()
			}
			dst = append(dst, body...)
		case utf8.Valid(res.body):
			dst = jsontext.AppendString(dst, string(res.body))
		default:
			dst = append(dst, '"')
			dst = base64.StdEncoding.AppendEncode(dst, res.body)
			dst = append(dst, `","body_encoding":"base64"`...)
		}
	}
	if res.err != "" {
		dst = append(dst, `,"error":`...)
		dst = jsontext.AppendString(dst, res.err)
	}
	if res.undone != nil {
		dst = append(dst, `,"undone":`...)
		dst = strconv.AppendBool(dst, *res.undone)
	}
	if res.rollback != nil {
		dst = append(dst, `,"rollback":`...)
		dst = appendResult(dst, -1, &operation{id: op.id}, res.rollback, lean)
	}
	return append(dst, '}')
}

// writeError answers the whole batch with {"error": msg}.
func writeError(w http.ResponseWriter, status int, msg string) error {
	buf := append([]byte(`{"error":`), jsontext.AppendString(nil, msg)...)
	writeJSON(w, status, append(buf, '}'))
	return nil
}

// writeFaults answers 400 with every fault found in a batch.
func writeFaults(w http.ResponseWriter, faults badBatchError) error {
	return writeFaultList(w, http.StatusBadRequest, "invalid batch", faults)
}

// writeFaultList answers status with msg and the faults.
func writeFaultList(w http.ResponseWriter, status int, msg string, faults badBatchError) error {
	buf := jsontext.AppendString(append([]byte(nil), `{"error":`...), msg)
	buf = append(buf, `,"errors":[`...)
	for i, f := range faults {
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, '{')
		if f.Index >= 0 {
			buf = append(buf, `"index":`...)
			buf = strconv.AppendInt(buf, int64(f.Index), 10)
			buf = append(buf, `,"id":`...)
			buf = jsontext.AppendString(buf, f.ID)
			buf = append(buf, ',')
		}
		buf = append(buf, `"message":`...)
		buf = jsontext.AppendString(buf, f.Message)
		buf = append(buf, '}')
	}
	writeJSON(w, status, append(buf, "]}"...))
	return nil
}

// writeDryRun answers a dry run: each operation as it would be sent, with
// the headers it would carry after inheritance and dropping, running none.
// The answer repeats the inherited headers for every operation, so it is
// written as it is made, in chunks: a megabyte of headers and max_ops
// operations must not become one buffer.
func writeDryRun(w http.ResponseWriter, b *batch, inherited http.Header) error {
	sent := false
	buf := []byte(`{"dry_run":true,"total":`)
	buf = strconv.AppendInt(buf, int64(len(b.ops)), 10)
	buf = append(buf, `,"mode":`...)
	buf = jsontext.AppendString(buf, b.mode)
	buf = append(buf, `,"atomicity":`...)
	buf = jsontext.AppendString(buf, b.atomicity)
	buf = append(buf, `,"operations":[`...)
	for i, op := range b.ops {
		if i > 0 {
			buf = append(buf, ',')
		}
		header := inherited.Clone()
		for k, v := range op.header {
			header[k] = v
		}
		buf = append(buf, `{"id":`...)
		buf = jsontext.AppendString(buf, op.id)
		buf = append(buf, `,"method":`...)
		buf = jsontext.AppendString(buf, op.method)
		buf = append(buf, `,"path":`...)
		buf = jsontext.AppendString(buf, op.target)
		buf = appendHeaders(append(buf, ','), header)
		if op.cond != nil {
			buf = append(buf, `,"if":`...)
			buf = jsontext.AppendString(buf, op.cond.String())
		}
		buf = append(buf, `,"body_size":`...)
		buf = strconv.AppendInt(buf, int64(len(op.body)), 10)
		if len(op.deps) > 0 {
			buf = append(buf, `,"depends_on":[`...)
			for j, d := range op.deps {
				if j > 0 {
					buf = append(buf, ',')
				}
				buf = jsontext.AppendString(buf, b.ops[d].id)
			}
			buf = append(buf, ']')
		}
		buf = append(buf, '}')
		if len(buf) >= sinkChunk {
			if !sent {
				sent = true
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusOK)
			}
			_, _ = w.Write(buf)
			buf = buf[:0]
		}
	}
	buf = append(buf, "]}"...)
	if !sent {
		writeJSON(w, http.StatusOK, buf)
		return nil
	}
	_, _ = w.Write(buf)
	return nil
}

// httpSink writes a batch's native answer to the client as results come.
type httpSink struct {
	w    http.ResponseWriter
	form int
	lean leanOptions
	out  chunkWriter
}

func (s *httpSink) put(_ int, op *operation, res *result) {
	if !s.out.started() {
		s.start()
	} else {
		s.out.buf = append(s.out.buf, ',')
	}
	s.out.buf = appendResult(s.out.buf, -1, op, res, s.lean)
	s.out.maybeWrite()
}

func (s *httpSink) start() {
	if s.form == formArray {
		s.out.start(s.w, "application/json", "[")
	} else {
		s.out.start(s.w, "application/json", `{"results":[`)
	}
}

func (s *httpSink) close(sum summary) {
	if !s.out.started() {
		s.start()
	}
	s.out.buf = append(s.out.buf, ']')
	if s.form != formArray {
		s.out.buf = appendSummary(s.out.buf, sum)
		s.out.buf = append(s.out.buf, '}')
	}
	s.out.finish()
}

// ndjsonSink writes one result per line, each with its index, the moment it
// is final, then a line with the summary (Accept: application/x-ndjson).
type ndjsonSink struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	lean    leanOptions // oneLine set
	started bool
	buf     []byte
}

func (s *ndjsonSink) put(index int, op *operation, res *result) {
	if !s.started {
		s.started = true
		s.w.Header().Set("Content-Type", "application/x-ndjson")
		// Each line is for the client the moment it is written: for
		// intermediaries (RFC 10036), and for Caddy's encoder, which then
		// compresses and flushes line by line however short they are.
		s.w.Header().Set("Incremental", "?1")
		s.w.WriteHeader(http.StatusOK)
	}
	s.buf = append(appendResult(s.buf[:0], index, op, res, s.lean), '\n')
	_, _ = s.w.Write(s.buf)
	_ = s.rc.Flush()
}

func (s *ndjsonSink) close(sum summary) {
	s.buf = appendSummary(append(s.buf[:0], `{"summary":true`...), sum)
	s.buf = append(s.buf, "}\n"...)
	_, _ = s.w.Write(s.buf)
	_ = s.rc.Flush()
}

func (rn *runner) summary() summary {
	s := summary{total: len(rn.results), metadata: rn.b.metadata}
	unmet, budget := 0, 0
	for i := range rn.results {
		if rn.results[i].cut {
			s.cut++
		}
		if rn.results[i].err == errBudgetExhausted {
			budget++
		}
		switch outcomeOf(&rn.results[i]) {
		case outcomeSucceeded:
			s.succeeded++
		case outcomeSkipped:
			s.skipped++
			if rn.results[i].unmet() {
				unmet++
			}
		default:
			s.failed++
		}
	}
	switch {
	case rn.rollbackFailed.Load():
		s.status = statusRollbackFailed
	case rn.stoppedAt >= 0 && rn.b.atomicity == atomicAllOrNothing:
		s.status = statusRolledBack
	case rn.stoppedAt >= 0:
		s.status = statusAborted
	case budget > 0:
		s.status = statusStopped
	case s.failed == 0 && s.skipped == unmet: // a false condition is no error
		s.status = statusCompleted
	default:
		s.status = statusCompletedWithErrors
	}
	return s
}
