package batch

import (
	"net/http"
	"strings"

	"github.com/tidwall/gjson"
)

// format is a wire format of batches: it decodes a request body into the
// validated operations the engine runs, and answers with their results,
// the summary and whole-batch errors in its own shape.
type format interface {
	// name identifies the format in logs and in stored jobs.
	name() string
	// decode parses and validates body, sent in r; the error is a
	// badBatchError, a tooManyOpsError, or the context's once the client
	// has gone.
	decode(r *http.Request, body []byte, lim *rules) (*batch, error)
	// sink writes the results of b to w, as r asked for them.
	sink(w http.ResponseWriter, r *http.Request, b *batch) sink
	// refuse answers the whole batch with status, msg and, for a batch
	// that is not valid, its faults.
	refuse(w http.ResponseWriter, status int, msg string, faults badBatchError) error
}

// formatNamed returns the format of that name ("" is native), nil if none.
func formatNamed(name string) format {
	for _, f := range []format{native, jsonBatch, multipartMixed} {
		if f.name() == name || name == "" && f == native {
			return f
		}
	}
	return nil
}

// formatOf picks the format of a batch by its Content-Type and the shape
// of its body (nil: before it is read); nil when no batch is sent with
// that Content-Type. None of those is CORS-safelisted: a browser sends
// none of them cross-site without a preflight, so no page can make a
// visitor's browser run operations.
func formatOf(ct string, body []byte) format {
	switch {
	case isJSONType(ct) && isJSONBatch(body):
		return jsonBatch
	case isJSONType(ct):
		return native
	case multipartBoundary(ct) != "":
		return multipartMixed
	}
	return nil
}

// isNDJSON reports whether a Content-Type is application/x-ndjson: one
// operation per line, for async jobs.
func isNDJSON(ct string) bool {
	mt, _, _ := strings.Cut(ct, ";")
	return strings.EqualFold(strings.TrimSpace(mt), "application/x-ndjson")
}

// isJSONType reports whether a Content-Type is application/json or
// application/*+json.
func isJSONType(ct string) bool {
	// Read per result: no mime.ParseMediaType, which allocates.
	if ct == "application/json" {
		return true
	}
	mt, _, _ := strings.Cut(ct, ";")
	mt = strings.TrimSpace(mt)
	const app, suffix = "application/", "+json"
	return strings.EqualFold(mt, "application/json") ||
		len(mt) > len(app)+len(suffix) && strings.EqualFold(mt[:len(app)], app) && strings.EqualFold(mt[len(mt)-len(suffix):], suffix)
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

// isJSONBatch reports whether a JSON body is a JSON batch: an object with
// "requests". The lookup walks the top level only, without recursion.
func isJSONBatch(body []byte) bool {
	for _, c := range body {
		switch c {
		case ' ', '\t', '\r', '\n':
			continue
		case '{':
			return gjson.GetBytes(body, "requests").Exists()
		}
		return false
	}
	return false
}
