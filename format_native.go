package batch

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strconv"
	"unicode/utf8"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/tidwall/gjson"
)

// Request forms; the answer mirrors the form of the request.
const (
	formArray    = iota // bare array of operations
	formEnvelope        // {"batch": [...], ...}
	formBulk            // {"operation": {...}, "items": [...], ...}
)

// nativeFormat is caddy-batch's own: a bare array of operations, an
// envelope, or one operation with many items; answered in the same form.
type nativeFormat struct{}

var native format = nativeFormat{}

func (nativeFormat) name() string { return "native" }

func (nativeFormat) decode(r *http.Request, body []byte, lim *limits) (*batch, error) {
	return parseBatch(r.Context(), body, lim)
}

// sink streams results as JSON, or as NDJSON when r asks for it.
func (nativeFormat) sink(w http.ResponseWriter, r *http.Request, b *batch) sink {
	if wantsNDJSON(r) {
		b.lean.oneLine = true
		return &ndjsonSink{w: w, rc: http.NewResponseController(w), lean: b.lean}
	}
	return &httpSink{w: w, form: b.form, lean: b.lean}
}

func (nativeFormat) refuse(w http.ResponseWriter, status int, msg string, faults badBatchError) error {
	if len(faults) > 0 {
		return writeFaults(w, faults)
	}
	return writeError(w, status, msg)
}

// parseBatch parses and validates a whole batch body. The error is a
// badBatchError, a tooManyOpsError, or ctx's error once the client is gone;
// nothing may run unless it is nil.
func parseBatch(ctx context.Context, body []byte, lim *limits) (*batch, error) {
	problem, topCommas := jsontext.Check(body, maxJSONDepth)
	if problem != "" {
		return nil, badBatchError{{Index: -1, Message: "batch " + problem}}
	}
	root := gjson.ParseBytes(body)
	p := parser{lim: lim, ctx: ctx}
	b := &batch{}
	var opsJSON, template gjson.Result
	var items gjson.Result

	switch {
	case root.IsArray():
		b.form = formArray
		opsJSON = root
	case root.IsObject():
		b.form = formEnvelope
		seen := map[string]bool{}
		root.ForEach(func(k, v gjson.Result) bool {
			key := k.String()
			if seen[key] {
				p.batchFault("field %q given twice", short(key))
				return true
			}
			seen[key] = true
			switch key {
			case "batch":
				opsJSON = v
				if !v.IsArray() {
					p.batchFault(`"batch" must be an array of operations`)
				}
			case "operation":
				template = v
				b.form = formBulk
			case "items":
				items = v
				if !v.IsArray() {
					p.batchFault("\"items\" must be an array")
				}
			case "mode":
				switch s := v.String(); {
				case v.Type == gjson.String && (s == modeSequential || s == modeParallel):
					b.mode = s
				default:
					p.batchFault("mode must be \"sequential\" or \"parallel\", got %s", short(v.Raw))
				}
			case "atomicity":
				switch s := v.String(); {
				case v.Type == gjson.String && (s == atomicNone || s == atomicStopOnError || s == atomicAllOrNothing):
					b.atomicity = s
				default:
					p.batchFault("atomicity must be \"none\", \"stop_on_error\" or \"all_or_nothing\", got %s", short(v.Raw))
				}
			case "async", "dry_run", "omit_response_on_success", "include_headers":
				if !v.IsBool() {
					p.batchFault("%s must be true or false, got %s", key, short(v.Raw))
				}
				switch key {
				case "async":
					b.async = v.Bool()
				case "dry_run":
					b.dryRun = v.Bool()
				case "omit_response_on_success":
					b.lean.omitSuccess = v.Bool()
				case "include_headers":
					b.lean.noHeaders = !v.Bool()
				}
			default:
				p.batchFault("unknown field %q", short(key))
			}
			return true
		})
		switch {
		case b.form == formBulk && opsJSON.Exists():
			p.batchFault("give either \"batch\" or \"operation\" with \"items\", not both")
		case b.form == formBulk && !items.Exists():
			p.batchFault("\"operation\" needs \"items\"")
		case b.form == formEnvelope && items.Exists():
			p.batchFault("\"items\" needs \"operation\"")
		case b.form == formEnvelope && !opsJSON.Exists():
			p.batchFault("missing \"batch\": the array of operations")
		}
	default:
		return nil, badBatchError{{Index: -1, Message: "batch must be a JSON array of operations or an object"}}
	}
	if err := p.errFaults(); err != nil {
		return nil, err
	}

	// Count before parsing any operation, so an oversized batch costs nothing.
	list := opsJSON
	if b.form == formBulk {
		list = items
	}
	var n int
	if b.form == formArray && topCommas > 0 {
		n = topCommas + 1 // counted on the way: no second pass
	} else {
		n = jsontext.Count(list)
	}
	if err := p.counted(n); err != nil {
		return nil, err
	}
	if b.mode == "" {
		b.mode = lim.mode
	}
	if b.atomicity == "" {
		b.atomicity = lim.atomicity
	}
	if b.atomicity != atomicNone {
		b.mode = modeSequential // a failure must stop what comes after it
	}

	p.alloc(b, n)
	if b.form == formBulk {
		p.parseBulk(b, template, items)
	} else {
		p.parseEach(b, list, nil)
	}
	return p.finish(b)
}

// parseBulk expands {"operation": ..., "items": [...]} into one operation
// per item, all sharing the template's validated method, target and headers.
func (p *parser) parseBulk(b *batch, template, items gjson.Result) {
	tmpl := p.parseOperation(-1, template, kindBulk)
	if len(tmpl.depIDs) > 0 {
		p.opFault(tmpl, "the operation of a bulk batch cannot have depends_on")
	}
	encoding := template.Get("body_encoding")
	// Operations share the template's header map; those whose body needs a
	// default Content-Type share one copy per type.
	headerFor := map[string]http.Header{}
	items.ForEach(func(_, item gjson.Result) bool {
		i := len(b.ops)
		op := p.newOp()
		*op = operation{
			index:  i,
			id:     p.defaultID(i),
			method: tmpl.method,
			target: tmpl.target,
			header: tmpl.header,
		}
		if tmpl.url != nil { // each its own: it becomes the sub-request's
			op.url = p.newURL()
			*op.url = *tmpl.url
		}
		if ctype := p.parseBody(op, item, encoding); ctype != "" && tmpl.header.Get("Content-Type") == "" {
			h, ok := headerFor[ctype]
			if !ok {
				h = tmpl.header.Clone()
				if h == nil {
					h = make(http.Header, 1)
				}
				h["Content-Type"] = []string{ctype}
				headerFor[ctype] = h
			}
			op.header = h
		}
		b.ops = append(b.ops, op)
		return p.goOn(len(b.ops))
	})
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
	if s.page != nil {
		dst = append(dst, `,"offset":`...)
		dst = strconv.AppendInt(dst, int64(s.page.offset), 10)
		dst = append(dst, `,"limit":`...)
		dst = strconv.AppendInt(dst, int64(s.page.limit), 10)
	}
	if s.err != "" {
		dst = append(dst, `,"error":`...)
		dst = jsontext.AppendString(dst, s.err)
	}
	return dst
}

// appendResult appends the JSON of one result.
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
			buf = jsontext.AppendString(buf, f.ID)
			buf = append(buf, ',')
		}
		buf = append(buf, `"message":`...)
		buf = jsontext.AppendString(buf, f.Message)
		buf = append(buf, '}')
	}
	writeJSON(w, http.StatusBadRequest, append(buf, "]}"...))
	return nil
}

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
