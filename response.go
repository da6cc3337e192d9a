package batch

import (
	"cmp"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
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
	// attempts counts tries when retry_429 retried the operation.
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
func failed(res *result) bool { return res.status >= 400 }

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
}

// page is which results of a job an answer holds.
type page struct{ offset, limit int }

// Envelope statuses.
const (
	statusCompleted           = "completed"
	statusCompletedWithErrors = "completed_with_errors"
	statusAborted             = "aborted"
	statusRolledBack          = "rolled_back"
	statusRollbackFailed      = "rollback_failed"
)

// How one operation counts in a summary.
const (
	outcomeSucceeded = iota
	outcomeFailed
	outcomeSkipped
)

// outcomeOf counts answers below 400 as succeeded, and operations the
// batch layer did not run (424) as skipped.
func outcomeOf(res *result) int {
	switch {
	case res.status < 400:
		return outcomeSucceeded
	case res.status == statusSkipped && res.err != "":
		return outcomeSkipped
	}
	return outcomeFailed
}

func (rn *runner) summary() summary {
	s := summary{total: len(rn.results)}
	for i := range rn.results {
		if rn.results[i].cut {
			s.cut++
		}
		switch outcomeOf(&rn.results[i]) {
		case outcomeSucceeded:
			s.succeeded++
		case outcomeSkipped:
			s.skipped++
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
	case s.failed+s.skipped == 0:
		s.status = statusCompleted
	default:
		s.status = statusCompletedWithErrors
	}
	return s
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
			if wait, ok := retryAfter(res.header); ok {
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

// maxAnswerDepth bounds the nesting of an answer embedded as JSON. The JSON
// check recurses once per level, and an answer nested deeper (a client can
// have an API store any blob and return it) would overflow the stack, which
// no recover catches; such an answer goes in as text.
const maxAnswerDepth = 512

// jsonBody reports whether an answer's body is JSON by its Content-Type,
// valid, in UTF-8 and at most maxAnswerDepth deep, so that it can stand in
// the batch's JSON as a value: the batch answer must stay valid JSON text.
func jsonBody(header http.Header, body []byte) bool {
	return len(body) > 0 && isJSONType(contentType(header)) && validJSON(body, maxAnswerDepth)
}

// contentType is h.Get("Content-Type"), without canonicalizing a name
// that already is: it is read for every result.
func contentType(h http.Header) string {
	if v := h["Content-Type"]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// appendHeaders appends "headers":{...}, names sorted, values joined.
func appendHeaders(dst []byte, h http.Header) []byte {
	dst = append(dst, `"headers":{`...)
	if v, ok := h["Content-Type"]; ok && len(h) == 1 && len(v) > 0 { // the usual answer: no sorting
		dst = append(dst, `"Content-Type":`...)
		dst = appendString(dst, strings.Join(v, ", "))
		return append(dst, '}')
	}
	var arr [16]string
	for i, name := range sortedNames(arr[:0], h) {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = appendString(dst, name)
		dst = append(dst, ':')
		dst = appendString(dst, strings.Join(h[name], ", "))
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
