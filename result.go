package batch

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/tidwall/gjson"
)

// summary counts the outcome of a batch.
type summary struct {
	status                            string
	total, succeeded, failed, skipped int
	retryAfter                        int // seconds; 0 when no operation was told to wait
	// cut counts operations the batch's end kept from finishing: a batch
	// with any did not run to its end.
	cut int
}

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
	case rn.rollbackFailed:
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

// sink takes a batch's encoded results in request order, then its summary.
type sink interface {
	put(index int, res *result, enc []byte)
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
	buf  []byte
	// hold keeps every result until finish.
	hold bool
	lean leanOptions
	// retryAfter is the longest Retry-After of the 429 answers, in seconds.
	retryAfter int
}

func newEmitter(out sink, b *batch, results []result) *emitter {
	return &emitter{out: out, ops: b.ops, results: results, done: make([]bool, len(results)), lean: b.lean}
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
		e.buf = appendResult(e.buf[:0], e.ops[e.next].id, res, e.lean)
		if res.status == http.StatusTooManyRequests {
			if wait, ok := retryAfter(res.header); ok {
				e.retryAfter = max(e.retryAfter, int((wait+time.Second-1)/time.Second))
			}
		}
		e.out.put(e.next, res, e.buf)
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

// httpSink writes a batch's answer to the client as results come, in
// chunks of about sinkChunk bytes: one write per result would cost a pass
// through every response writer wrapper (Caddy's idle timeout resets the
// connection's deadline on each) for ~200 bytes. An answer that ends
// within its first chunk goes out whole, with a Content-Length.
type httpSink struct {
	w       http.ResponseWriter
	form    int
	started bool // the envelope is opened
	sent    bool // the status line and headers are written
	buf     []byte
}

const sinkChunk = 32 << 10

// sinkBufs holds chunk buffers between batches.
var sinkBufs = sync.Pool{New: func() any { return new([]byte) }}

func (s *httpSink) put(_ int, _ *result, enc []byte) {
	if !s.started {
		s.start()
	} else {
		s.buf = append(s.buf, ',')
	}
	s.buf = append(s.buf, enc...)
	if len(s.buf) >= sinkChunk {
		s.write()
	}
}

func (s *httpSink) start() {
	s.started = true
	s.buf = (*sinkBufs.Get().(*[]byte))[:0]
	if s.form == formArray {
		s.buf = append(s.buf, '[')
	} else {
		s.buf = append(s.buf, `{"results":[`...)
	}
}

// write sends what is buffered, after the status line the first time.
func (s *httpSink) write() {
	if !s.sent {
		s.sent = true
		s.w.Header().Set("Content-Type", "application/json")
		s.w.WriteHeader(http.StatusOK)
	}
	_, _ = s.w.Write(s.buf)
	s.buf = s.buf[:0]
}

func (s *httpSink) close(sum summary) {
	if !s.started {
		s.start()
	}
	s.buf = append(s.buf, ']')
	if s.form != formArray {
		s.buf = appendSummary(s.buf, sum)
		s.buf = append(s.buf, '}')
	}
	if !s.sent {
		s.w.Header().Set("Content-Length", strconv.Itoa(len(s.buf)))
	}
	s.write()
	if cap(s.buf) <= 4*sinkChunk { // one huge answer does not stay in the pool
		buf := s.buf[:0]
		sinkBufs.Put(&buf)
	}
	s.buf = nil
}

// ndjsonSink writes one result per line, each with its index, the moment it
// is final, then a line with the summary (Accept: application/x-ndjson).
type ndjsonSink struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	started bool
	buf     []byte
}

func (s *ndjsonSink) put(index int, _ *result, enc []byte) {
	if !s.started {
		s.started = true
		s.w.Header().Set("Content-Type", "application/x-ndjson")
		s.w.WriteHeader(http.StatusOK)
	}
	s.buf = append(s.buf[:0], `{"index":`...)
	s.buf = strconv.AppendInt(s.buf, int64(index), 10)
	s.buf = append(s.buf, ',')
	s.buf = append(s.buf, enc[1:]...) // enc is {"id":...}
	s.buf = append(s.buf, '\n')
	_, _ = s.w.Write(s.buf)
	_ = s.rc.Flush()
}

func (s *ndjsonSink) close(sum summary) {
	s.buf = appendSummary(append(s.buf[:0], `{"summary":true`...), sum)
	s.buf = append(s.buf, "}\n"...)
	_, _ = s.w.Write(s.buf)
	_ = s.rc.Flush()
}

// wantsNDJSON reports whether the client asked for results as NDJSON.
func wantsNDJSON(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept") {
		for _, part := range splitComma(v) {
			mt, _, _ := strings.Cut(part, ";")
			if strings.EqualFold(strings.TrimSpace(mt), "application/x-ndjson") {
				return true
			}
		}
	}
	return false
}

// appendSummary appends the envelope fields after "results".
func appendSummary(dst []byte, s summary) []byte {
	dst = append(dst, `,"status":`...)
	dst = appendString(dst, s.status)
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
	return dst
}

// appendResult appends the JSON of one result.
func appendResult(dst []byte, id string, res *result, lean leanOptions) []byte {
	dst = append(dst, `{"id":`...)
	dst = appendString(dst, id)
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
			dst = appendString(dst, string(res.body))
		default:
			dst = append(dst, '"')
			dst = base64.StdEncoding.AppendEncode(dst, res.body)
			dst = append(dst, `","body_encoding":"base64"`...)
		}
	}
	if res.err != "" {
		dst = append(dst, `,"error":`...)
		dst = appendString(dst, res.err)
	}
	if res.undone != nil {
		dst = append(dst, `,"undone":`...)
		dst = strconv.AppendBool(dst, *res.undone)
	}
	if res.rollback != nil {
		dst = append(dst, `,"rollback":`...)
		dst = appendResult(dst, id, res.rollback, lean)
	}
	return append(dst, '}')
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

// validJSON reports whether b is one JSON value in UTF-8 nested at most
// depth levels. The depth is checked first, without recursion, so that the
// recursive validator that follows is bounded by it.
func validJSON(b []byte, depth int) bool {
	return depthWithin(b, depth) && utf8.Valid(b) && gjson.ValidBytes(b)
}

// depthWithin reports whether the arrays and objects of b, outside its
// strings, nest at most limit levels. Unbalanced input is left to the
// validator: only the depth it would reach matters here.
func depthWithin(b []byte, limit int) bool {
	depth := 0
	for i := 0; i < len(b); i++ {
		switch b[i] {
		case '"':
			for i++; i < len(b) && b[i] != '"'; i++ {
				if b[i] == '\\' {
					i++
				}
			}
		case '{', '[':
			if depth++; depth > limit {
				return false
			}
		case '}', ']':
			depth--
		}
	}
	return true
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
	if v, ok := h["Content-Type"]; ok && len(h) == 1 { // the usual answer: no sorting
		dst = append(dst, `"Content-Type":`...)
		dst = appendString(dst, strings.Join(v, ", "))
		return append(dst, '}')
	}
	var arr [16]string
	names := arr[:0]
	for name := range h {
		names = append(names, name)
	}
	slices.Sort(names)
	for i, name := range names {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = appendString(dst, name)
		dst = append(dst, ':')
		dst = appendString(dst, strings.Join(h[name], ", "))
	}
	return append(dst, '}')
}

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string; invalid UTF-8 becomes U+FFFD.
func appendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i++
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// writeError answers the whole batch with {"error": msg}.
func writeError(w http.ResponseWriter, status int, msg string) error {
	buf := append([]byte(`{"error":`), appendString(nil, msg)...)
	writeJSON(w, status, append(buf, '}'))
	return nil
}

// writeFaults answers 400 with every fault found in a batch.
func writeFaults(w http.ResponseWriter, faults badBatchError) error {
	buf := []byte(`{"error":"invalid batch","errors":[`)
	for i, f := range faults {
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, '{')
		if f.Index >= 0 {
			buf = append(buf, `"index":`...)
			buf = strconv.AppendInt(buf, int64(f.Index), 10)
			buf = append(buf, `,"id":`...)
			buf = appendString(buf, f.ID)
			buf = append(buf, ',')
		}
		buf = append(buf, `"message":`...)
		buf = appendString(buf, f.Message)
		buf = append(buf, '}')
	}
	writeJSON(w, http.StatusBadRequest, append(buf, "]}"...))
	return nil
}

func writeJSON(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// splitComma splits a comma-separated header value into trimmed parts.
func splitComma(v string) []string {
	var parts []string
	for p := range strings.SplitSeq(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			parts = append(parts, p)
		}
	}
	return parts
}

func stack() string { return string(debug.Stack()) }

// writeDryRun answers a dry run: each operation as it would be sent, with
// the headers it would carry after inheritance and dropping, running none.
// The answer repeats the inherited headers for every operation, so it is
// written as it is made, in chunks: a megabyte of headers and max_ops
// operations must not become one buffer.
func (h *Handler) writeDryRun(w http.ResponseWriter, r *http.Request, b *batch) error {
	inherited := h.inheritedHeaders(r.Header)
	sent := false
	buf := []byte(`{"dry_run":true,"total":`)
	buf = strconv.AppendInt(buf, int64(len(b.ops)), 10)
	buf = append(buf, `,"mode":`...)
	buf = appendString(buf, b.mode)
	buf = append(buf, `,"atomicity":`...)
	buf = appendString(buf, b.atomicity)
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
		buf = appendString(buf, op.id)
		buf = append(buf, `,"method":`...)
		buf = appendString(buf, op.method)
		buf = append(buf, `,"path":`...)
		buf = appendString(buf, op.target)
		buf = appendHeaders(append(buf, ','), header)
		buf = append(buf, `,"body_size":`...)
		buf = strconv.AppendInt(buf, int64(len(op.body)), 10)
		if len(op.deps) > 0 {
			buf = append(buf, `,"depends_on":[`...)
			for j, d := range op.deps {
				if j > 0 {
					buf = append(buf, ',')
				}
				buf = appendString(buf, b.ops[d].id)
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
