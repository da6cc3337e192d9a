package batch

import (
	"net/http"
	"strings"
)

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
